//! Real tools for source tests: umoci-made OCI layouts, skopeo copies,
//! and a throwaway docker-registry on 127.0.0.1.

use std::path::{Path, PathBuf};

pub use kiln_tests::registry::{sh, Registry};

/// An OCI layout at `dir/oci` with tag `t`: two umoci-made layers
/// (busybox, a symlink, a hardlink, a non-root file, then a deletion that
/// becomes a whiteout) and a run config.
pub fn umoci_image(dir: &Path) -> PathBuf {
    let d = dir.display();
    sh(&format!(
        r#"cd {d}
        umoci init --layout oci
        umoci new --image oci:t
        umoci unpack --image oci:t bundle >/dev/null
        r=bundle/rootfs
        mkdir -p $r/bin $r/etc $r/gone/sub $r/home/user $r/init.d
        cp /bin/busybox $r/bin/busybox
        ln -s busybox $r/bin/sh
        echo kiln-test > $r/etc/hostname
        ln $r/etc/hostname $r/etc/hostname.hard
        echo secret > $r/home/user/file
        chown -R 1000:1000 $r/home/user
        chmod 0640 $r/home/user/file
        echo x > $r/gone/sub/x
        echo keep > $r/etc/keep
        echo drop > $r/etc/drop
        umoci repack --image oci:t bundle
        rm -rf $r/gone $r/etc/drop
        echo new > $r/etc/new
        umoci repack --image oci:t bundle
        umoci config --image oci:t --config.cmd sh --config.cmd -c --config.cmd 'ls /' \
            --config.env A=b --config.workingdir /srv --config.user 1000:1000
        umoci gc --layout oci
        rm -rf bundle"#
    ));
    dir.join("oci")
}
