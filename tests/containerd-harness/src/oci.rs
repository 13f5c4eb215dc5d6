//! Tiny OCI test images, built here without a registry or docker: each is an OCI image
//! layout (`oci-layout`, `index.json`, `blobs/sha256/...`) in a tar archive that
//! `ctr images import` names from the index's `org.opencontainers.image.ref.name`.
//! One uncompressed layer holding a static busybox and its applet links. The archives
//! are deterministic (fixed mtimes, sorted entries), so their digests are stable.

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The busybox image: `sh` by default.
pub const BUSYBOX_REF: &str = "vfvm.test/busybox:1";
/// The pause image: waits until SIGTERM or SIGINT, then exits 0.
pub const PAUSE_REF: &str = "vfvm.test/pause:1";
/// busybox plus Debian's iperf3 and the libraries it links (for the network
/// benchmark); built when the host has [`IPERF3`].
pub const IPERF3_REF: &str = "vfvm.test/iperf3:1";
/// Debian's iperf3.
pub const IPERF3: &str = "/usr/bin/iperf3";

/// The pause image's entrypoint. `sleep & wait` rather than a bare `sleep`, so the
/// shell runs its trap as soon as the signal arrives (a shell defers traps until the
/// foreground command ends); as PID 1 it only gets signals it has handlers for.
const PAUSE_SCRIPT: &str = "#!/bin/sh\ntrap 'exit 0' TERM INT\nwhile :; do sleep 3600 & wait $!; done\n";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An image archive written by [`build_test_images`].
#[derive(Debug, Clone)]
pub struct ImageArchive {
    pub reference: &'static str,
    pub path: PathBuf,
    /// `sha256:...` of the image manifest, as containerd reports it after import.
    pub manifest_digest: String,
}

/// Writes `busybox.tar` and `pause.tar` into `out_dir` (created if needed), both from
/// the static busybox at `busybox`.
pub fn build_test_images(busybox: &Path, out_dir: &Path) -> Result<Vec<ImageArchive>> {
    let bytes = std::fs::read(busybox).with_context(|| format!("reading busybox {}", busybox.display()))?;
    let applets = applets(busybox)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut images = Vec::new();
    let base = rootfs_layer(&bytes, &applets, &[])?;
    images.push(write_image(out_dir, "busybox.tar", BUSYBOX_REF, &base, &[], &["sh"])?);
    let pause = rootfs_layer(&bytes, &applets, &[("pause".into(), 0o755, PAUSE_SCRIPT.as_bytes().to_vec())])?;
    images.push(write_image(out_dir, "pause.tar", PAUSE_REF, &pause, &["/pause"], &[])?);
    if Path::new(IPERF3).is_file() {
        let iperf3 = rootfs_layer(&bytes, &applets, &with_libraries(Path::new(IPERF3))?)?;
        images.push(write_image(out_dir, "iperf3.tar", IPERF3_REF, &iperf3, &[IPERF3], &["-s"])?);
    }
    Ok(images)
}

/// `binary` and the shared libraries `ldd` says it loads (the loader included), each
/// at the path it is loaded from: (path without the leading '/', mode, contents).
fn with_libraries(binary: &Path) -> Result<Vec<(String, u32, Vec<u8>)>> {
    let out = std::process::Command::new("ldd").arg(binary).output().with_context(|| format!("ldd {}", binary.display()))?;
    ensure!(out.status.success(), "ldd {}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    let mut paths = vec![binary.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        }
    }
    paths
        .iter()
        .map(|p| {
            let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let name = p.to_string_lossy().trim_start_matches('/').to_string();
            Ok((name, 0o755, data))
        })
        .collect()
}

/// The applet names busybox was built with (`busybox --list`).
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out =
        std::process::Command::new(busybox).arg("--list").output().with_context(|| format!("running {} --list", busybox.display()))?;
    ensure!(out.status.success(), "{} --list failed ({})", busybox.display(), out.status);
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        // Applet names are plain words; anything else would make a bad path.
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.[".contains(&b)) && *n != "busybox")
        .map(String::from)
        .collect();
    names.sort();
    names.dedup();
    ensure!(names.iter().any(|n| n == "sh"), "{} has no sh applet", busybox.display());
    Ok(names)
}

/// The root filesystem: `/bin/busybox`, a link per applet, the usual empty
/// directories, a root user, and `extra` files (path without the leading '/', mode,
/// contents) with their parent directories.
fn rootfs_layer(busybox: &[u8], applets: &[String], extra: &[(String, u32, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut tar = Tar::default();
    let mut dirs: Vec<String> =
        ["bin/", "dev/", "etc/", "proc/", "root/", "sys/", "tmp/", "usr/", "usr/bin/", "var/"].map(String::from).to_vec();
    for (name, _, _) in extra {
        let mut at = 0;
        while let Some(i) = name[at..].find('/') {
            at += i + 1;
            let dir = name[..at].to_string();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    for dir in &dirs {
        tar.dir(dir, if dir == "tmp/" { 0o1777 } else { 0o755 })?;
    }
    tar.file("bin/busybox", 0o755, busybox)?;
    for applet in applets {
        tar.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    tar.file("etc/group", 0o644, b"root:x:0:\n")?;
    tar.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    for (name, mode, data) in extra {
        tar.file(name, *mode, data)?;
    }
    Ok(tar.finish())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn descriptor(media_type: &str, hex: &str, size: usize) -> String {
    format!(r#"{{"mediaType":"{media_type}","digest":"sha256:{hex}","size":{size}}}"#)
}

fn json_strings(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("[{}]", quoted.join(","))
}

fn write_image(
    out_dir: &Path,
    file: &str,
    reference: &'static str,
    layer: &[u8],
    entrypoint: &[&str],
    cmd: &[&str],
) -> Result<ImageArchive> {
    // Uncompressed layer: its diff ID is its digest. Each blob is hashed once (the
    // layer is megabytes, and L2 runs this under TCG).
    let layer_hex = sha256_hex(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["{PATH_ENV}"],"Entrypoint":{},"Cmd":{},"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_hex}"]}}}}"#,
        json_strings(entrypoint),
        json_strings(cmd),
    );
    let config_hex = sha256_hex(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}]}}"#,
        descriptor("application/vnd.oci.image.config.v1+json", &config_hex, config.len()),
        descriptor("application/vnd.oci.image.layer.v1.tar", &layer_hex, layer.len())
    );
    let manifest_hex = sha256_hex(manifest.as_bytes());
    let manifest_digest = format!("sha256:{manifest_hex}");
    // The full reference in ref.name (and containerd's own annotation) names the image
    // on import without `--base-name`.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"io.containerd.image.name":"{reference}","org.opencontainers.image.ref.name":"{reference}"}}}}]}}"#,
        manifest.len()
    );

    let mut tar = Tar::default();
    tar.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    tar.file("index.json", 0o644, index.as_bytes())?;
    tar.dir("blobs/", 0o755)?;
    tar.dir("blobs/sha256/", 0o755)?;
    let mut blobs = [(layer_hex, layer), (config_hex, config.as_bytes()), (manifest_hex, manifest.as_bytes())];
    blobs.sort();
    for (hex, blob) in blobs {
        tar.file(&format!("blobs/sha256/{hex}"), 0o644, blob)?;
    }
    let path = out_dir.join(file);
    std::fs::write(&path, tar.finish()).with_context(|| format!("writing image archive {}", path.display()))?;
    Ok(ImageArchive { reference, path, manifest_digest })
}

/// A ustar archive writer: regular files, directories and symlinks, owned by root,
/// mtime 0. Names up to 100 bytes (all this module needs).
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn header(&mut self, name: &str, mode: u32, size: usize, kind: u8, link: &str) -> Result<()> {
        if name.len() > 100 || link.len() > 100 {
            bail!("tar entry {name:?} -> {link:?}: names over 100 bytes need a ustar prefix, which this writer does not do");
        }
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, width: usize, value: u64| {
            // width-1 octal digits, then NUL.
            let text = format!("{value:0w$o}", w = width - 1);
            h[at..at + width - 1].copy_from_slice(text.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(mode));
        octal(&mut h, 108, 8, 0); // uid
        octal(&mut h, 116, 8, 0); // gid
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, 0); // mtime
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        // The checksum is computed with its own field read as spaces.
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        let text = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(text.as_bytes());
        self.out.extend_from_slice(&h);
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.header(name, mode, data.len(), b'0', "")?;
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn dir(&mut self, name: &str, mode: u32) -> Result<()> {
        self.header(name, mode, 0, b'5', "")
    }

    fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.header(name, 0o777, 0, b'2', target)
    }

    fn pad(&mut self) {
        let rem = self.out.len() % 512;
        if rem != 0 {
            self.out.resize(self.out.len() + 512 - rem, 0);
        }
    }

    /// The archive with its end marker (two zero blocks).
    fn finish(mut self) -> Vec<u8> {
        self.out.resize(self.out.len() + 1024, 0);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GNU tar reads what the writer writes: names, kinds, modes, link targets, contents.
    #[test]
    fn tar_writer_output_reads_back_with_gnu_tar() {
        let mut tar = Tar::default();
        tar.dir("d/", 0o755).unwrap();
        tar.file("d/f", 0o640, b"hello\n").unwrap();
        tar.symlink("d/l", "f").unwrap();
        let dir = std::env::temp_dir().join(format!("vfvm-oci-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.tar");
        std::fs::write(&archive, tar.finish()).unwrap();
        let out = std::process::Command::new("tar").arg("-tvf").arg(&archive).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success(), "tar -tvf: {}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x root/root") && lines[0].ends_with(" d/"), "{listing}");
        assert!(lines[1].starts_with("-rw-r----- root/root") && lines[1].contains(" 6 ") && lines[1].ends_with(" d/f"), "{listing}");
        assert!(lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("d/l -> f"), "{listing}");
    }

    #[test]
    fn long_names_are_refused() {
        let mut tar = Tar::default();
        let err = tar.file(&"x".repeat(101), 0o644, b"").unwrap_err();
        assert!(err.to_string().contains("100 bytes"), "{err}");
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_strings(&[]), "[]");
        assert_eq!(json_strings(&["sh", "a\"b\\c"]), r#"["sh","a\"b\\c"]"#);
    }
}
