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

/// A `docker save` archive at `dir/styled.tar` exercising what a root
/// filesystem must carry: busybox with applet symlinks, a user, a 300001-
/// byte file and its hardlink, a set-uid file, a relative symlink, a file
/// owned by 1000:1000 with mode 0640; then a second layer that whites out
/// a file and a directory, makes a directory opaque and adds files. Its
/// command is `echo default-cmd`. Returns the archive and the host's
/// `sha256sum` lines for the data files (paths relative to the root).
pub fn styled_archive(dir: &Path) -> (PathBuf, String) {
    sh(&format!(
        r#"mkdir -p {0}; cd {0}
        mkdir -p l1/bin l1/etc l1/gone l1/opq l1/data l1/home/user l1/tmp l1/root
        cp /bin/busybox l1/bin/
        for a in $(/bin/busybox --list); do [ $a = busybox ] || ln -s busybox l1/bin/$a; done
        printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n' > l1/etc/passwd
        echo k > l1/etc/keep; echo d > l1/etc/drop; echo g > l1/gone/g; echo o > l1/opq/old
        head -c 300001 /dev/urandom > l1/data/big; ln l1/data/big l1/data/big-link
        head -c 65536 /dev/urandom > l1/data/suid; chmod 4755 l1/data/suid
        ln -s ../bin/busybox l1/data/bb-link
        echo secret > l1/home/user/file; chown -R 1000:1000 l1/home/user; chmod 0640 l1/home/user/file
        chmod 1777 l1/tmp; chmod 0700 l1/root
        (cd l1 && sha256sum data/big data/big-link data/suid) > sums
        mkdir -p l2/etc l2/opq
        : > l2/etc/.wh.drop; : > l2/.wh.gone; : > l2/opq/.wh..wh..opq
        echo n > l2/opq/new; echo n > l2/etc/new
        (cd l1 && tar --numeric-owner -cf ../l1.tar bin etc gone opq data home tmp root)
        (cd l2 && tar --numeric-owner -cf ../l2.tar etc/.wh.drop .wh.gone opq etc/new)
        d1=$(sha256sum l1.tar | cut -d' ' -f1); d2=$(sha256sum l2.tar | cut -d' ' -f1)
        printf '{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["echo","default-cmd"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:%s","sha256:%s"]}}}}' $d1 $d2 > config.json
        printf '[{{"Config":"config.json","RepoTags":["kiln/styled:1"],"Layers":["l1.tar","l2.tar"]}}]' > manifest.json
        tar -cf styled.tar manifest.json config.json l1.tar l2.tar
        rm -rf l1 l2 l1.tar l2.tar"#,
        dir.display()
    ));
    let sums = std::fs::read_to_string(dir.join("sums")).unwrap_or_default();
    (dir.join("styled.tar"), sums)
}

/// The Debian bookworm minbase + python3 image (tag `py`), built by
/// scripts/build-python-image.sh with debootstrap and umoci, or reused
/// from the kiln cache where that script built it before. Returns its OCI
/// layout directory. Needs root and the machine's Debian mirror.
pub fn python_layout() -> PathBuf {
    let script = crate::workspace_root().join("scripts/build-python-image.sh");
    let out = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let layout = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        layout.join("index.json").exists(),
        "no OCI layout at {}",
        layout.display()
    );
    layout
}
