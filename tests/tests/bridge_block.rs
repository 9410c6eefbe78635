//! kilnd's local backend with `rootfs = "block"`: a grant boots its image
//! from a read-only erofs disk under a writable overlay, reusing the build
//! `kiln image build --rootfs block` left in the same cache; the real kilnd,
//! kiln-shim and kiln-vmm, a real registry, the stock OpenSSH client. One
//! VM serves every assertion. Beside it, a kilnd on the initramfs path
//! refuses a grant too small for its image before booting anything.

use std::time::Duration;

use kiln_bridge::state::GrantState;
use kiln_tests::kilnd::{request, ssh_to, Kilnd, Requester, BOOT};
use kiln_tests::openssh::text;
use kiln_tests::{processes_mentioning, wait_for};

#[test]
fn a_block_root_grant_reuses_the_cached_build_and_boots_an_overlay_over_erofs() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let requester = Requester::new(work);
    let (image, key) = (&requester.image, &requester.key);
    let public = requester.public_key.as_str();

    let block_dir = work.join("block");
    std::fs::create_dir_all(&block_dir).unwrap();
    let kilnd = Kilnd::with_backend(&block_dir, 1, 512, "rootfs = \"block\"");
    let home = kilnd.home();

    // The operator builds the image first; the grant must boot that build.
    let out = kilnd.kiln_local(&["image", "build", "--rootfs", "block", "--json", image]);
    assert!(out.status.success(), "{out:?}");
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(built["rootfs"], "block", "{built}");
    let root_image = std::path::PathBuf::from(built["root_image"].as_str().unwrap());
    let stamp = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let root_image_made = stamp(&root_image);
    // The cache's builds (kilnd adds a digest-pinned reference to the same
    // build; that is no new build).
    let builds = |k: &Kilnd| {
        let out = k.kiln_local(&["image", "ls", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["key"].clone(),
                    b["rootfs"].clone(),
                    b["root_image"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = builds(&kilnd);
    assert_eq!(before.len(), 1, "{before:?}");

    kilnd
        .client()
        .submit(&request(
            "blk",
            image,
            public,
            Duration::from_secs(3600),
            "sleep 100000",
        ))
        .unwrap();
    let g = kilnd.wait_grant("blk", BOOT, |g| {
        g.state == GrantState::Running || g.state.is_final()
    });
    assert_eq!(g.state, GrantState::Running, "{g:?}\n{}", kilnd.log());
    // No second build: the same record, the same root image file.
    assert_eq!(builds(&kilnd), before);
    assert_eq!(stamp(&root_image), root_image_made);

    let ssh = ssh_to(&g, key, work);
    let out = ssh.ssh(&[], "cat /proc/mounts", b"");
    assert!(out.status.success(), "{out:?}");
    let mounts = text(&out.stdout);
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"/"))
        .unwrap_or_else(|| panic!("no / in:\n{mounts}"));
    assert_eq!(root[2], "overlay", "{mounts}");
    assert!(
        root[3].contains("lowerdir=") && root[3].contains("upperdir="),
        "{mounts}"
    );
    // The lower layer is the read-only erofs disk (the shim's first drive).
    let out = ssh.ssh(
        &[],
        "cat /sys/block/vda/ro; head -c 1028 /dev/vda | tail -c 4 | od -An -tx1",
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    // erofs's superblock magic, 0xE0F5E1E2, little-endian at 1024.
    assert_eq!(lines, ["1", "e2 e1 f5 e0"], "{out:?}");
    // The overlay takes writes where the image is read-only.
    let out = ssh.ssh(
        &[],
        "echo kept > /root/grant-note && cat /root/grant-note",
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "kept\n");

    // Terminate: the VM, its shim and its directory under vms/ are gone.
    let out = kilnd.kiln(&["grant", "terminate", "blk"]);
    assert!(out.status.success(), "{out:?}");
    let end = kilnd.wait_grant("blk", Duration::from_secs(120), |g| g.state.is_final());
    assert_eq!(end.state, GrantState::Terminated, "{end:?}");
    let gone = wait_for(Duration::from_secs(60), || {
        processes_mentioning(&home.to_string_lossy())
            .iter()
            .all(|p| !p.contains("kiln-shim") && !p.contains("kiln-vmm"))
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "{:?}",
        processes_mentioning(&home.to_string_lossy())
    );
    let vms: Vec<_> = std::fs::read_dir(home.join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(vms.is_empty(), "{vms:?}");
    // The cached build stays for the next grant or `kiln run`.
    assert!(root_image.exists());
    drop(kilnd);

    // On the initramfs path, a grant whose memory cannot hold the image
    // is refused before anything boots, with the figure and the field.
    let small_dir = work.join("initramfs");
    std::fs::create_dir_all(&small_dir).unwrap();
    let kilnd = Kilnd::with_backend(&small_dir, 1, 512, "rootfs = \"initramfs\"");
    let mut tiny = request("tiny", image, public, Duration::from_secs(3600), "true");
    tiny.ram_mib = 16;
    kilnd.client().submit(&tiny).unwrap();
    let t = kilnd.wait_grant("tiny", BOOT, |g| g.state.is_final());
    assert_eq!(t.state, GrantState::Failed, "{t:?}");
    let reason = t.reason.unwrap_or_default();
    assert!(
        reason.contains("16 MiB is too little")
            && reason.contains("at least")
            && reason.contains("ram_mib"),
        "{reason}"
    );
    assert!(!kilnd.home().join("grants/tiny").exists());
}
