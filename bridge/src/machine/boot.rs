//! What a VM boots from an image build: the initramfs and, for a block
//! root, the read-only root image and the kernel words that name it. The
//! one place a build becomes drives and kernel arguments, for `kiln run`
//! and the local backend's shim alike (which gets it through kilnd as
//! JSON).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Drive;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFiles {
    pub initrd: PathBuf,
    /// A block root's filesystem image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_image: Option<PathBuf>,
    /// What the guest kernel's command line must carry for this root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<String>,
    /// The build's measurement: what a saved snapshot of its VM is keyed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
}

impl BootFiles {
    /// What `built` needs booted; the kernel words come from kiln-image,
    /// which defines how the agent finds its root.
    pub fn of(built: &kiln_image::build::Built) -> BootFiles {
        BootFiles {
            initrd: built.path.clone(),
            root_image: built.root_image.clone(),
            kernel_args: built.kernel_arg().map(str::to_string).into_iter().collect(),
            measurement: Some(built.measurement.clone()),
        }
    }

    /// The root image, read-only and first, so the guest sees it as
    /// `/dev/vda`; further drives (a scratch disk) go after it.
    pub fn drives(&self) -> Vec<Drive> {
        self.root_image
            .iter()
            .map(|path| Drive {
                path: path.clone(),
                read_only: true,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_image::root::RootKind;

    #[test]
    fn a_block_root_is_the_first_drive_read_only_and_named_on_the_command_line() {
        let boot = BootFiles {
            initrd: "/i".into(),
            root_image: Some("/r.erofs".into()),
            kernel_args: vec![RootKind::Block.kernel_arg().unwrap().to_string()],
            measurement: Some("sha384:00".into()),
        };
        assert_eq!(
            boot.drives(),
            [Drive {
                path: "/r.erofs".into(),
                read_only: true
            }]
        );
        let json = serde_json::to_string(&boot).unwrap();
        assert_eq!(serde_json::from_str::<BootFiles>(&json).unwrap(), boot);
        let initramfs: BootFiles = serde_json::from_str(r#"{"initrd": "/i"}"#).unwrap();
        assert!(initramfs.drives().is_empty() && initramfs.kernel_args.is_empty());
    }
}
