//! A host's CPU and memory budget, shared by the grants placed on it.
//!
//! Reservations are keyed (by instance or grant id) so that releasing is
//! idempotent and a backend re-adopting instances after a restart can
//! account for them again without double counting.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// An amount of CPU and memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub vcpus: u32,
    pub ram_mib: u64,
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs and {} MiB", self.vcpus, self.ram_mib)
    }
}

impl Resources {
    pub fn new(vcpus: u32, ram_mib: u64) -> Self {
        Resources { vcpus, ram_mib }
    }

    fn fits_within(&self, other: &Resources) -> bool {
        self.vcpus <= other.vcpus && self.ram_mib <= other.ram_mib
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CapacityError {
    #[error("Not enough capacity: {wanted} asked, {free} free")]
    Insufficient { wanted: Resources, free: Resources },
    /// A backend of whole machines (cloud instances) has its most running.
    #[error("All {0} instances allowed are in use")]
    AllInstancesInUse(u32),
    #[error("Reserve of {reserve} leaves nothing of {total}")]
    ReserveTooLarge {
        total: Resources,
        reserve: Resources,
    },
    #[error("Overcommit ratio {0} must be a finite number of at least 1")]
    BadOvercommit(f64),
    #[error("Key {0} already holds a different reservation")]
    KeyInUse(String),
}

/// Totals and use at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacitySnapshot {
    /// What grants may use: (total - reserve), CPUs scaled by overcommit.
    pub usable: Resources,
    pub used: Resources,
}

impl CapacitySnapshot {
    pub fn free(&self) -> Resources {
        Resources {
            vcpus: self.usable.vcpus.saturating_sub(self.used.vcpus),
            ram_mib: self.usable.ram_mib.saturating_sub(self.used.ram_mib),
        }
    }
}

/// Atomic reserve/release of a host's capacity. A request that does not fit
/// is refused, never overcommitted beyond the configured ratio.
#[derive(Debug)]
pub struct CapacityLedger {
    usable: Resources,
    reservations: Mutex<HashMap<String, Resources>>,
}

impl CapacityLedger {
    /// `overcommit` scales CPUs only: guest memory is real memory once
    /// touched, and overcommitting it ends with the OOM killer.
    pub fn new(
        total: Resources,
        reserve: Resources,
        overcommit: Option<f64>,
    ) -> Result<Self, CapacityError> {
        let ratio = overcommit.unwrap_or(1.0);
        if !ratio.is_finite() || ratio < 1.0 {
            return Err(CapacityError::BadOvercommit(ratio));
        }
        let cpus = total.vcpus.saturating_sub(reserve.vcpus);
        let ram_mib = total.ram_mib.saturating_sub(reserve.ram_mib);
        if cpus == 0 || ram_mib == 0 {
            return Err(CapacityError::ReserveTooLarge { total, reserve });
        }
        let scaled = (f64::from(cpus) * ratio).floor();
        let vcpus = if scaled >= f64::from(u32::MAX) {
            u32::MAX
        } else {
            scaled as u32
        };
        Ok(CapacityLedger {
            usable: Resources { vcpus, ram_mib },
            reservations: Mutex::new(HashMap::new()),
        })
    }

    /// Reserves `want` under `key`, or refuses if it does not fit. Reserving
    /// the same amount again under the same key is a no-op.
    pub fn reserve(&self, key: &str, want: Resources) -> Result<(), CapacityError> {
        let mut held = self.lock();
        if let Some(existing) = held.get(key) {
            return if *existing == want {
                Ok(())
            } else {
                Err(CapacityError::KeyInUse(key.to_string()))
            };
        }
        let free = Self::snapshot_of(self.usable, &held).free();
        if !want.fits_within(&free) {
            return Err(CapacityError::Insufficient { wanted: want, free });
        }
        held.insert(key.to_string(), want);
        Ok(())
    }

    /// Records a reservation for something that already exists (an instance
    /// re-adopted after a restart), even if it no longer fits: the ledger
    /// must reflect what is really running. Returns whether it fitted.
    pub fn adopt(&self, key: &str, want: Resources) -> bool {
        let mut held = self.lock();
        if held.contains_key(key) {
            return true;
        }
        let fits = want.fits_within(&Self::snapshot_of(self.usable, &held).free());
        if !fits {
            tracing::warn!(key, ?want, "adopted reservation exceeds free capacity");
        }
        held.insert(key.to_string(), want);
        fits
    }

    /// Releases what `key` holds; releasing twice is harmless.
    pub fn release(&self, key: &str) -> Option<Resources> {
        self.lock().remove(key)
    }

    /// Whether `want` would fit now (a hint: only `reserve` decides).
    pub fn fits(&self, want: Resources) -> bool {
        want.fits_within(&self.snapshot().free())
    }

    pub fn snapshot(&self) -> CapacitySnapshot {
        Self::snapshot_of(self.usable, &self.lock())
    }

    fn snapshot_of(usable: Resources, held: &HashMap<String, Resources>) -> CapacitySnapshot {
        let used = held
            .values()
            .fold(Resources::default(), |acc, r| Resources {
                vcpus: acc.vcpus.saturating_add(r.vcpus),
                ram_mib: acc.ram_mib.saturating_add(r.ram_mib),
            });
        CapacitySnapshot { usable, used }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Resources>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every update is one insert or remove), so a poisoned lock is
        // still consistent.
        self.reservations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ledger(cpus: u32, ram: u64) -> CapacityLedger {
        CapacityLedger::new(Resources::new(cpus, ram), Resources::default(), None).unwrap()
    }

    #[test]
    fn reserve_refuses_what_does_not_fit_and_release_frees_it() {
        let l = ledger(4, 1024);
        l.reserve("a", Resources::new(3, 512)).unwrap();
        let err = l.reserve("b", Resources::new(2, 256)).unwrap_err();
        assert_eq!(
            err,
            CapacityError::Insufficient {
                wanted: Resources::new(2, 256),
                free: Resources::new(1, 512)
            }
        );
        assert!(l.reserve("b", Resources::new(1, 1024)).is_err());
        l.reserve("b", Resources::new(1, 512)).unwrap();
        assert_eq!(l.snapshot().free(), Resources::new(0, 0));
        assert_eq!(l.release("a"), Some(Resources::new(3, 512)));
        assert_eq!(l.release("a"), None);
        assert_eq!(l.snapshot().used, Resources::new(1, 512));
    }

    #[test]
    fn same_key_is_idempotent_and_a_different_amount_is_refused() {
        let l = ledger(4, 1024);
        l.reserve("a", Resources::new(1, 100)).unwrap();
        l.reserve("a", Resources::new(1, 100)).unwrap();
        assert_eq!(l.snapshot().used, Resources::new(1, 100));
        assert!(matches!(
            l.reserve("a", Resources::new(2, 100)),
            Err(CapacityError::KeyInUse(_))
        ));
    }

    #[test]
    fn reserve_and_overcommit_shape_the_usable_amount() {
        let l = CapacityLedger::new(Resources::new(8, 16384), Resources::new(2, 2048), Some(1.5))
            .unwrap();
        assert_eq!(l.snapshot().usable, Resources::new(9, 14336));
        assert!(CapacityLedger::new(Resources::new(2, 10), Resources::new(2, 0), None).is_err());
        assert!(
            CapacityLedger::new(Resources::new(2, 10), Resources::default(), Some(0.5)).is_err()
        );
        assert!(
            CapacityLedger::new(Resources::new(2, 10), Resources::default(), Some(f64::NAN))
                .is_err()
        );
    }

    #[test]
    fn adopt_records_even_past_capacity() {
        let l = ledger(2, 100);
        l.reserve("a", Resources::new(2, 100)).unwrap();
        assert!(!l.adopt("b", Resources::new(1, 10)));
        assert_eq!(l.snapshot().used, Resources::new(3, 110));
        assert_eq!(l.snapshot().free(), Resources::new(0, 0));
    }

    #[test]
    fn concurrent_reserves_never_exceed_capacity() {
        let l = Arc::new(ledger(10, 10_000));
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    l.reserve(&format!("k{i}"), Resources::new(1, 100)).is_ok()
                })
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| matches!(r, Ok(true)))
            .count();
        // A join error would be a panic in reserve; it counts as a failure here.
        assert_eq!(ok, 10);
        assert_eq!(l.snapshot().used, Resources::new(10, 1000));
    }
}
