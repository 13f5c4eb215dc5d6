//! The two containerd release lines the shim is tested against, side by side:
//! Debian bookworm's 1.6 (with runc) is an ordinary apt package (see
//! `host::ensure_packages`); Debian sid's 2.1 is fetched with an apt state of its own
//! (sources, lists and cache under the lab cache: the system's apt configuration and
//! package set stay untouched; sid comes from the mirror apt uses for this release)
//! and unpacked with `dpkg-deb -x` under [`SID_PREFIX`], so `/usr/bin/containerd`
//! stays 1.6.
//! Also `cargo xtask oci-images`: the registry-free test images.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use vfvm_test_containerd::{Version, SID_PREFIX};

use crate::apt_sources;
use crate::host::run;
use crate::install_log::InstallLog;
use crate::progress;

/// The installed sid containerd's `--version` line, if it is of the 2.1 line.
fn installed_sid() -> Option<String> {
    Version::V2_1.check_installed().ok()
}

/// Installs Debian sid's containerd 2.1 under [`SID_PREFIX`] unless it is already
/// there; asks no registry when it is. apt's output goes to `<cache>/install.log`.
pub fn ensure_sid(cache: &Path) -> Result<()> {
    if installed_sid().is_some() {
        return Ok(());
    }
    let log = InstallLog::in_cache(cache);
    let mirror = apt_sources::system_mirror()
        .context("containerd 2.1 comes from Debian sid, fetched from the mirror apt uses for this machine's release")?;
    let apt = cache.join("apt-sid");
    progress!("fetching containerd 2.1 from Debian sid at {} into {SID_PREFIX} (apt state of its own in {})", mirror.uri, apt.display());
    for dir in ["etc/sources.list.d", "etc/preferences.d", "lists/partial", "cache/archives/partial", "debs"] {
        let d = apt.join(dir);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    // The entry is deb822 (its Signed-By may be an embedded key, which the one-line
    // format cannot hold), so it goes in the parts directory; the one-line list is empty.
    let sources = apt.join("etc/sources.list");
    std::fs::write(&sources, "# Debian sid: see sources.list.d/sid.sources\n").with_context(|| format!("writing {}", sources.display()))?;
    let sid_sources = apt.join("etc/sources.list.d/sid.sources");
    std::fs::write(&sid_sources, mirror.sources_stanza(&["sid"])).with_context(|| format!("writing {}", sid_sources.display()))?;
    let o = |key: &str, path: PathBuf| format!("{key}={}", path.display());
    let opts = [
        o("Dir::Etc::SourceList", sources.clone()),
        o("Dir::Etc::SourceParts", apt.join("etc/sources.list.d")),
        o("Dir::Etc::Preferences", apt.join("etc/preferences")),
        o("Dir::Etc::PreferencesParts", apt.join("etc/preferences.d")),
        o("Dir::State::Lists", apt.join("lists")),
        o("Dir::Cache", apt.join("cache")),
        // Downloads land in our directory, which the _apt user cannot write.
        "APT::Sandbox::User=root".to_string(),
    ];
    let with_opts = |tool: &str| {
        let mut cmd = Command::new(tool);
        for opt in &opts {
            cmd.args(["-o", opt]);
        }
        cmd
    };
    log.run("apt-get update for Debian sid (own apt state)", with_opts("apt-get").args(["update", "-q"]))?;
    let shown = run(with_opts("apt-cache").args(["show", "--no-all-versions", "containerd"]))?;
    let candidate = shown.lines().find_map(|l| l.strip_prefix("Version: ")).unwrap_or_default().trim().to_string();
    ensure!(
        candidate.starts_with("2.1."),
        "Debian sid's containerd is {candidate:?}, not 2.1.x: the lab installs containerd 2.1 at {SID_PREFIX} \
         (update vfvm-test-containerd's SID_PREFIX and Version::V2_1 for a new release line)"
    );
    let debs = apt.join("debs");
    for old in std::fs::read_dir(&debs)?.filter_map(|e| e.ok()) {
        std::fs::remove_file(old.path()).with_context(|| format!("removing {}", old.path().display()))?;
    }
    log.run(
        &format!("downloading containerd {candidate} from Debian sid"),
        with_opts("apt-get").current_dir(&debs).args(["download", "-q", &format!("containerd={candidate}")]),
    )?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download containerd={candidate} left no .deb in {}", debs.display()))?;

    // Unpacked beside the final place, then renamed: a half-unpacked tree never
    // passes for an installed one.
    let prefix = Path::new(SID_PREFIX);
    let parent = prefix.parent().context("SID_PREFIX has no parent directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(".containerd-2.1.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging)).with_context(|| format!("unpacking {}", deb.display()))?;
    if prefix.exists() {
        std::fs::remove_dir_all(prefix).with_context(|| format!("removing the old {}", prefix.display()))?;
    }
    std::fs::rename(&staging, prefix).with_context(|| format!("moving {} to {}", staging.display(), prefix.display()))?;
    // The lists (~30 MB) and the .deb are only needed again for a new version.
    std::fs::remove_dir_all(&apt).with_context(|| format!("removing {}", apt.display()))?;
    let Some(version) = installed_sid() else {
        bail!("unpacked {} into {SID_PREFIX}, but {} does not report containerd 2.1", deb.display(), Version::V2_1.containerd().display());
    };
    progress!("installed {version} at {SID_PREFIX}");
    Ok(())
}

/// `cargo xtask oci-images [--out DIR]`: writes the test image archives and prints
/// `<reference> <manifest digest> <path>` for each.
pub fn oci_images(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const USAGE: &str = "usage: cargo xtask oci-images [--out DIR]   (default DIR: ./oci-images)";
    let mut out = PathBuf::from("oci-images");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().with_context(|| format!("--out needs a directory; {USAGE}"))?),
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(0);
            }
            other => bail!("unknown option {other:?}; {USAGE}"),
        }
    }
    let busybox = crate::host::find_busybox().context("no static busybox: run `cargo xtask install` (busybox-static)")?;
    for image in vfvm_test_containerd::oci::build_test_images(&busybox, &out)? {
        println!("{} {} {}", image.reference, image.manifest_digest, image.path.display());
    }
    Ok(0)
}
