//! Small real images for end-to-end tests, made with umoci.

use std::path::{Path, PathBuf};

use crate::registry::sh;

/// A busybox OCI layout at `dir/oci`, tag `1`: every applet linked in
/// /bin, a root user, PATH=/bin, and `echo default-cmd` as its command.
pub fn busybox_layout(dir: &Path) -> PathBuf {
    sh(&format!(
        r#"mkdir -p {0}; cd {0}
        umoci init --layout oci
        umoci new --image oci:1
        umoci unpack --image oci:1 b >/dev/null
        r=b/rootfs; mkdir -p $r/bin $r/etc $r/tmp $r/root
        cp /bin/busybox $r/bin/
        for a in $(/bin/busybox --list); do [ $a = busybox ] || ln -s busybox $r/bin/$a; done
        echo 'root:x:0:0:root:/root:/bin/sh' > $r/etc/passwd
        umoci repack --image oci:1 b
        umoci config --image oci:1 --config.env PATH=/bin --config.cmd echo --config.cmd default-cmd
        rm -rf b"#,
        dir.display()
    ));
    dir.join("oci")
}
