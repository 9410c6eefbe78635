//! Serde for plain-old-data KVM structs that kvm-bindings does not
//! serialize (`kvm_fpu`): their bytes, checked for length on the way back.

use serde::{Deserialize, Deserializer, Serializer};

/// Types made only of integers and arrays of integers: every byte pattern
/// is a valid value.
pub trait Pod: Copy {}
impl Pod for kvm_bindings::kvm_fpu {}

pub fn serialize<T: Pod, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    // SAFETY: T is Pod (no padding read as uninit in practice: the KVM
    // structs are packed to their natural alignment), viewed as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    s.serialize_bytes(bytes)
}

pub fn deserialize<'de, T: Pod, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let bytes = Vec::<u8>::deserialize(d)?;
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(serde::de::Error::invalid_length(
            bytes.len(),
            &"the struct's size",
        ));
    }
    // SAFETY: the length matches and every byte pattern is a valid T (Pod).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
