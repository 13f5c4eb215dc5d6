//! `vfvm-lab guest vsock-probe`: runs inside an L3 guest (the probe image's /init
//! starts it) and moves data over virtio-vsock both ways, checking every byte.
//!
//! - It listens on `--listen-port`, says so on the console, and serves `--streams`
//!   host-initiated connections: each sends an 8-byte stream id and then `--bytes`
//!   bytes of [`pattern_byte`]; the probe checks them and echoes them back.
//! - Meanwhile it opens `--streams` connections to the host (CID 2) port
//!   `--host-port`: sends the id and the pattern, and checks the host's echo.
//!
//! Console lines: `<L3 marker> probe listening <port>`, then one
//! `probe guest-initiated ...` and one `probe host-initiated ...` verdict (`ok` or
//! `FAILED ...`). Exit status 0 only if both are ok.

use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::images::L3_MARKER;
use crate::vsock::{accept, listen};

/// The host's context id.
const HOST_CID: u32 = 2;
/// Every stream must finish within this (TCG-nested guests are slow, not stuck).
const STREAM_LIMIT: Duration = Duration::from_secs(300);

/// Byte `offset` of stream `id`'s data: changes with every byte and every stream, with
/// no short period, so a lost, repeated or misplaced chunk shows.
pub fn pattern_byte(id: u64, offset: u64) -> u8 {
    // The low byte of the mix.
    (offset ^ (offset >> 9) ^ (offset >> 17) ^ id.wrapping_mul(0x9d)).wrapping_mul(0x45).to_le_bytes()[0]
}

struct Options {
    host_port: u32,
    listen_port: u32,
    streams: u64,
    bytes: u64,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut o = Options { host_port: 5000, listen_port: 5001, streams: 2, bytes: 1 << 20 };
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        let n: u64 = v.parse().with_context(|| format!("{flag} {v:?}: expected a number"))?;
        match flag.as_str() {
            "--host-port" => o.host_port = u32::try_from(n)?,
            "--listen-port" => o.listen_port = u32::try_from(n)?,
            "--streams" => o.streams = n,
            "--bytes" => o.bytes = n,
            other => bail!("unknown option {other:?}"),
        }
    }
    ensure!((1..=64).contains(&o.streams), "--streams: 1 to 64");
    Ok(o)
}

fn connect(port: u32) -> Result<File> {
    let fd = vfvm_protocols::client::vsock_connect(HOST_CID, port, STREAM_LIMIT).with_context(|| format!("connect to host port {port}"))?;
    Ok(File::from(fd))
}

fn set_timeouts(f: &File) -> Result<()> {
    let tv_sec = libc::time_t::try_from(STREAM_LIMIT.as_secs()).expect("STREAM_LIMIT is minutes, far below time_t's range");
    let tv = libc::timeval { tv_sec, tv_usec: 0 };
    let timeval_size = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).expect("a timeval is 16 bytes");
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt with a timeval of the right size.
        let rc = unsafe { libc::setsockopt(f.as_raw_fd(), libc::SOL_SOCKET, opt, &tv as *const _ as *const libc::c_void, timeval_size) };
        ensure!(rc == 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_pattern(w: &mut File, id: u64, bytes: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < bytes {
        let n = usize::try_from(bytes - off).map_or(buf.len(), |left| left.min(buf.len()));
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern_byte(id, off + i as u64);
        }
        w.write_all(&buf[..n]).with_context(|| format!("stream {id}: writing at byte {off}"))?;
        off += n as u64;
    }
    Ok(())
}

/// Reads exactly `bytes` of stream `id`'s pattern; `echo` gets each chunk as read.
fn check_pattern(r: &mut File, id: u64, bytes: u64, mut echo: Option<&mut File>) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < bytes {
        let want = usize::try_from(bytes - off).map_or(buf.len(), |left| left.min(buf.len()));
        let n = r.read(&mut buf[..want]).with_context(|| format!("stream {id}: reading at byte {off}"))?;
        ensure!(n > 0, "stream {id}: closed after {off} of {bytes} bytes");
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern_byte(id, off + i as u64)) {
            bail!("stream {id}: byte {} is {:#04x}, expected {:#04x}", off + i as u64, buf[i], pattern_byte(id, off + i as u64));
        }
        if let Some(w) = echo.as_deref_mut() {
            w.write_all(&buf[..n]).with_context(|| format!("stream {id}: echoing at byte {off}"))?;
        }
        off += n as u64;
    }
    Ok(())
}

/// One guest-initiated stream: send id + pattern while checking the echo.
fn guest_stream(port: u32, id: u64, bytes: u64) -> Result<()> {
    let mut s = connect(port)?;
    set_timeouts(&s)?;
    s.write_all(&id.to_le_bytes())?;
    let mut writer = s.try_clone()?;
    let sender = std::thread::spawn(move || write_pattern(&mut writer, id, bytes));
    let checked = check_pattern(&mut s, id, bytes, None);
    let sent = sender.join().map_err(|_| anyhow::anyhow!("stream {id}: the writer panicked"))?;
    sent.and(checked)
}

/// One host-initiated stream: read the id, check and echo the pattern.
fn host_stream(mut s: File, bytes: u64) -> Result<u64> {
    set_timeouts(&s)?;
    let mut id = [0u8; 8];
    s.read_exact(&mut id).context("reading the stream id")?;
    let id = u64::from_le_bytes(id);
    let mut echo = s.try_clone()?;
    check_pattern(&mut s, id, bytes, Some(&mut echo))?;
    Ok(id)
}

fn verdict(what: &str, results: Vec<Result<()>>, streams: u64, bytes: u64, started: Instant) -> bool {
    let failures: Vec<String> = results.into_iter().filter_map(|r| r.err().map(|e| format!("{e:#}"))).collect();
    if failures.is_empty() {
        println!("{L3_MARKER} probe {what} ok {streams} streams x {bytes} bytes in {:.1} s", started.elapsed().as_secs_f64());
        true
    } else {
        println!("{L3_MARKER} probe {what} FAILED: {}", failures.join("; "));
        false
    }
}

pub fn vsock_probe(args: impl Iterator<Item = String>) -> Result<i32> {
    let o = parse(args)?;
    let listener = listen(o.listen_port, 64)?;
    println!("{L3_MARKER} probe listening {}", o.listen_port);
    std::io::stdout().flush()?;

    let started = Instant::now();
    let (streams, bytes, host_port) = (o.streams, o.bytes, o.host_port);
    let outgoing: Vec<_> = (0..streams).map(|id| std::thread::spawn(move || guest_stream(host_port, id, bytes))).collect();
    let mut incoming = Vec::new();
    let mut accept_errors = Vec::new();
    for _ in 0..streams {
        match accept(&listener) {
            Ok(s) => incoming.push(std::thread::spawn(move || host_stream(s, bytes))),
            Err(e) => {
                accept_errors.push(Err(e));
                break;
            }
        }
    }
    let join = |h: std::thread::JoinHandle<Result<()>>| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a stream thread panicked")));
    let out_ok = verdict("guest-initiated", outgoing.into_iter().map(join).collect(), streams, bytes, started);
    let mut ids = Vec::new();
    let mut in_results: Vec<Result<()>> = accept_errors;
    for h in incoming {
        match h.join() {
            Ok(Ok(id)) => {
                ids.push(id);
                in_results.push(Ok(()));
            }
            Ok(Err(e)) => in_results.push(Err(e)),
            Err(_) => in_results.push(Err(anyhow::anyhow!("a stream thread panicked"))),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.len() as u64 != streams && in_results.iter().all(|r| r.is_ok()) {
        in_results.push(Err(anyhow::anyhow!("stream ids {ids:?}: expected {streams} distinct")));
    }
    let in_ok = verdict("host-initiated", in_results, streams, bytes, started);
    Ok(if out_ok && in_ok { 0 } else { 1 })
}

/// `vfvm-lab guest wait-power-button`: waits for the ACPI power button (the VMM's
/// graceful shutdown) and reports it; the probe image's /init then powers off.
pub fn wait_power_button() -> Result<i32> {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let mut device = None;
    for entry in std::fs::read_dir("/sys/class/input").context("/sys/class/input")? {
        let entry = entry?;
        let name = std::fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        let node = entry.file_name().to_string_lossy().into_owned();
        if name.trim() == "Power Button" && node.starts_with("event") {
            device = Some(format!("/dev/input/{node}"));
        }
    }
    let device = device.context("no input device named \"Power Button\" (is the ACPI button driver loaded?)")?;
    let mut f = File::open(&device).with_context(|| format!("opening {device}"))?;
    println!("{L3_MARKER} probe waiting for the power button on {device}");
    std::io::stdout().flush()?;
    // struct input_event on x86_64: timeval (16 bytes), type u16, code u16, value i32.
    let mut ev = [0u8; 24];
    loop {
        f.read_exact(&mut ev).with_context(|| format!("reading {device}"))?;
        let kind = u16::from_le_bytes([ev[16], ev[17]]);
        let code = u16::from_le_bytes([ev[18], ev[19]]);
        let value = i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            println!("{L3_MARKER} probe power button pressed");
            return Ok(0);
        }
    }
}

/// FNV-1a 64, continued from `h`: the virtio-fs probe's digest (the lab test computes
/// the same over the host's tree).
pub fn fnv1a64_update(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The most entries the virtio-fs probe walks (the tree is the test's own, small).
const MAX_TREE_ENTRIES: usize = 10_000;

/// Digest of a directory tree: entries in sorted path order, `D <path>\n` for a
/// directory, `F <path> <size>\n` then the contents for a file (paths relative,
/// without a leading slash). Returns the digest, the file count, the byte count and
/// the largest file's read (bytes, seconds).
fn tree_digest(root: &std::path::Path) -> Result<(u64, usize, u64, (u64, f64))> {
    let mut entries = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            let path = e.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let ty = e.file_type()?;
            if ty.is_dir() {
                todo.push(path.clone());
            }
            entries.push((rel, ty.is_dir(), path));
            ensure!(entries.len() <= MAX_TREE_ENTRIES, "more than {MAX_TREE_ENTRIES} entries under {}", root.display());
        }
    }
    entries.sort();
    let (mut h, mut files, mut bytes, mut largest) = (FNV_OFFSET, 0, 0u64, (0u64, 0f64));
    for (rel, is_dir, path) in entries {
        if is_dir {
            h = fnv1a64_update(h, format!("D {rel}\n").as_bytes());
            continue;
        }
        let started = Instant::now();
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let secs = started.elapsed().as_secs_f64();
        if data.len() as u64 >= largest.0 {
            largest = (data.len() as u64, secs);
        }
        h = fnv1a64_update(h, format!("F {rel} {}\n", data.len()).as_bytes());
        h = fnv1a64_update(h, &data);
        files += 1;
        bytes += data.len() as u64;
    }
    Ok((h, files, bytes, largest))
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// `vfvm-lab guest virtiofs-probe --tag TAG --write NAME --write-bytes N
/// [--backend-death-port PORT]`: mounts the virtio-fs `TAG`, reports the digest of its
/// tree (see [`tree_digest`]) and the read speed of its largest file, writes `NAME` at
/// its root (`N` bytes of [`pattern_byte`] stream 7), reads it back, and unmounts.
///
/// With `--backend-death-port`, before unmounting it listens on that vsock port, says
/// so, and waits for the host to connect (the host kills virtiofsd first); then file
/// operations on the mount must fail with EIO (the VMM answers for the dead backend).
///
/// Console lines: `<L3 marker> probe virtiofs digest <hex> files <n> bytes <n>`,
/// `probe virtiofs read <n> bytes in <s> s (<x> MiB/s)`, `probe virtiofs wrote ...`,
/// (`probe virtiofs waiting for the host on vsock port <p>`, `probe virtiofs backend
/// gone: EIO`) and `probe virtiofs ok`; any failure is the error of this command.
pub fn virtiofs_probe(mut args: impl Iterator<Item = String>) -> Result<i32> {
    const MNT: &str = "/mnt/virtiofs";
    const WRITE_ID: u64 = 7;
    let (mut tag, mut write, mut write_bytes, mut death_port) = (None, None, 0u64, None);
    while let Some(flag) = args.next() {
        let v = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tag" => tag = Some(v),
            "--write" => write = Some(v),
            "--write-bytes" => write_bytes = v.parse().with_context(|| format!("--write-bytes {v:?}"))?,
            "--backend-death-port" => death_port = Some(v.parse::<u32>().with_context(|| format!("--backend-death-port {v:?}"))?),
            other => bail!("unknown option {other:?}"),
        }
    }
    let tag = tag.context("--tag is required")?;
    let write = write.context("--write is required")?;
    ensure!(!write.contains('/') && write_bytes <= 1 << 30, "--write: a plain name; --write-bytes: at most 1 GiB");
    std::fs::create_dir_all(MNT)?;
    let c = |s: &str| std::ffi::CString::new(s).context("NUL in an argument");
    let (src, dst, fstype) = (c(&tag)?, c(MNT)?, c("virtiofs")?);
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!("mount -t virtiofs {tag} {MNT}: {}", std::io::Error::last_os_error());
    }
    let root = std::path::Path::new(MNT);
    let (digest, files, bytes, (big, secs)) = tree_digest(root)?;
    println!("{L3_MARKER} probe virtiofs digest {digest:016x} files {files} bytes {bytes}");
    println!("{L3_MARKER} probe virtiofs read {big} bytes in {secs:.3} s ({:.1} MiB/s)", mib_per_s(big, secs));
    std::io::stdout().flush()?;

    let path = root.join(&write);
    let started = Instant::now();
    {
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        write_pattern(&mut f, WRITE_ID, write_bytes)?;
        f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{L3_MARKER} probe virtiofs wrote {write} {write_bytes} bytes in {secs:.3} s ({:.1} MiB/s)", mib_per_s(write_bytes, secs));
    let mut f = File::open(&path).with_context(|| format!("reopening {}", path.display()))?;
    check_pattern(&mut f, WRITE_ID, write_bytes, None).with_context(|| format!("reading {} back", path.display()))?;
    let mut extra = [0u8; 1];
    ensure!(f.read(&mut extra)? == 0, "{} is longer than written", path.display());
    drop(f);
    if let Some(port) = death_port {
        let listener = listen(port, 1)?;
        println!("{L3_MARKER} probe virtiofs waiting for the host on vsock port {port}");
        std::io::stdout().flush()?;
        drop(accept(&listener)?);
        let errno = |r: std::io::Result<()>, what: &str| -> Result<()> {
            match r {
                Ok(()) => bail!("{what} worked with the backend gone"),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
                Err(e) => bail!("{what}: {e}, expected EIO"),
            }
        };
        errno(std::fs::metadata(root.join(&write)).map(drop), "stat")?;
        errno(std::fs::read(root.join(&write)).map(drop), "read")?;
        errno(File::create(root.join("after-death")).map(drop), "create")?;
        println!("{L3_MARKER} probe virtiofs backend gone: EIO");
        // The unmount's own requests fail too; the mount goes regardless.
        // SAFETY: umount2(2) of the mount made above.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
        println!("{L3_MARKER} probe virtiofs ok");
        return Ok(0);
    }
    // SAFETY: umount(2) of the mount made above.
    if unsafe { libc::umount(dst.as_ptr()) } != 0 {
        bail!("umount {MNT}: {}", std::io::Error::last_os_error());
    }
    println!("{L3_MARKER} probe virtiofs ok");
    Ok(0)
}
