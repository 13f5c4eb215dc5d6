//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (cargo fuzz on the nightly
//! toolchain, AddressSanitizer), each run for a bounded time from its seeds
//! (`fuzz/seeds/<target>`) and the corpus earlier runs grew (in the lab cache). A crash,
//! a leak or a hang fails the run and names the input that caused it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::install_log::InstallLog;
use crate::progress;

/// Every fuzz target, in the order they run.
pub const TARGETS: [&str; 4] = ["virtio_pci", "host_api", "pod_inputs", "agent_replies"];
/// The cargo-fuzz installed when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// An input that runs longer than this is a hang (libFuzzer's -timeout).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// What one target's run found.
#[derive(Debug, PartialEq)]
pub struct FuzzRun {
    pub target: String,
    pub runs: u64,
    pub coverage: u64,
    pub corpus: u64,
    /// The input that crashed, leaked or hung the target.
    pub failed: Option<String>,
}

impl FuzzRun {
    /// Reads libFuzzer's output: the last status line (`#N ... cov: C ... corp: K/..`),
    /// `Done N runs`, and where a failing input was written.
    pub fn parse(target: &str, output: &str) -> FuzzRun {
        let field = |line: &str, name: &str| -> Option<u64> {
            let rest = line.split(name).nth(1)?;
            let word = rest.split_whitespace().next()?;
            word.split('/').next()?.parse().ok()
        };
        let mut run = FuzzRun { target: target.into(), runs: 0, coverage: 0, corpus: 0, failed: None };
        for line in output.lines() {
            if let Some(c) = field(line, " cov: ") {
                run.coverage = c;
            }
            if let Some(c) = field(line, " corp: ") {
                run.corpus = c;
            }
            if let Some(n) = line.strip_prefix("Done ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()) {
                run.runs = n;
            } else if let Some(n) = line.strip_prefix('#').and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()) {
                run.runs = run.runs.max(n);
            }
            if let Some((_, path)) = line.split_once("Test unit written to ") {
                run.failed = Some(path.trim().to_string());
            }
        }
        run
    }
}

/// The repository's root (this crate is `tests/lab`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The nightly toolchain (cargo fuzz needs it) and cargo-fuzz, installed if missing.
fn ensure_tools(log: &InstallLog) -> Result<()> {
    let works = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ensure!(
        works(&["+nightly", "--version"]),
        "cargo xtask fuzz needs the nightly toolchain beside stable (`rustup toolchain install nightly`), which this machine lacks"
    );
    if !works(&["fuzz", "--version"]) {
        log.run(
            &format!("installing cargo-fuzz {CARGO_FUZZ_VERSION} with cargo install (once; a few minutes)"),
            Command::new("cargo").args(["install", "--locked", "--version", CARGO_FUZZ_VERSION, "cargo-fuzz"]),
        )?;
    }
    Ok(())
}

/// Builds every target, then runs each for `seconds`. Returns each target's figures.
pub fn run_targets(cache: &Path, seconds: u64, targets: &[String]) -> Result<Vec<FuzzRun>> {
    ensure_tools(&InstallLog::in_cache(cache))?;
    let fuzz_dir = repo_root().join("fuzz");
    progress!("building the fuzz targets (cargo +nightly fuzz build, AddressSanitizer)");
    let built = Command::new("cargo")
        .args(["+nightly", "fuzz", "build"])
        .current_dir(&fuzz_dir)
        .stdin(Stdio::null())
        .status()
        .context("running cargo fuzz build")?;
    ensure!(built.success(), "cargo +nightly fuzz build failed (its output above)");
    let mut runs = Vec::new();
    for target in targets {
        let corpus = cache.join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let out_path = cache.join("fuzz-corpus").join(format!("{target}.log"));
        let out = std::fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
        progress!("fuzzing {target} for {seconds} s (corpus {}, output {})", corpus.display(), out_path.display());
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target.as_str()])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .current_dir(&fuzz_dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        let mut run = FuzzRun::parse(target, &output);
        if !status.success() {
            let tail: Vec<&str> = output.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("{}", tail.join("\n"));
            run.failed.get_or_insert_with(|| format!("(no input written; cargo fuzz exited with {status}: see {})", out_path.display()));
        }
        println!(
            "fuzz {target}: {} runs in {seconds} s, coverage {} edges, corpus {} inputs: {}",
            run.runs,
            run.coverage,
            run.corpus,
            match &run.failed {
                None => "no crash, leak or hang".to_string(),
                Some(input) => format!("FAILED on {input}"),
            }
        );
        runs.push(run);
    }
    Ok(runs)
}

/// `cargo xtask fuzz [--seconds N] [TARGET...]`.
pub fn fuzz_command(cache: &Path, mut args: impl Iterator<Item = String>) -> Result<i32> {
    let mut seconds = 300;
    let mut targets = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let v = args.next().context("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--seconds {v:?}: expected a whole number of seconds, at least 1"))?;
            }
            t if TARGETS.contains(&t) => targets.push(t.to_string()),
            other => bail!("cargo xtask fuzz: {other:?} is not a fuzz target (they are {})", TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let runs = run_targets(cache, seconds, &targets)?;
    let failed = runs.iter().filter(|r| r.failed.is_some()).count();
    println!("\nfuzz targets: {} run for {seconds} s each, {failed} failed", runs.len());
    Ok(if failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzers_output_is_read() {
        let ok = "INFO: Seed: 1\n#2\tINITED cov: 526 ft: 526 corp: 1/1b exec/s: 0 rss: 70Mb\n\
                  #504971\tDONE   cov: 1265 ft: 5031 corp: 773/170Kb lim: 1266 exec/s: 8278 rss: 436Mb\nDone 504971 runs in 61 second(s)\n";
        assert_eq!(
            FuzzRun::parse("virtio_pci", ok),
            FuzzRun { target: "virtio_pci".into(), runs: 504_971, coverage: 1265, corpus: 773, failed: None }
        );
        let crash = "#1000\tNEW    cov: 90 ft: 100 corp: 12/300b\n==1==ERROR: AddressSanitizer: heap-buffer-overflow\n\
                     artifact_prefix='/r/fuzz/artifacts/host_api/'; Test unit written to /r/fuzz/artifacts/host_api/crash-abc\n";
        let run = FuzzRun::parse("host_api", crash);
        assert_eq!((run.runs, run.coverage, run.failed.as_deref()), (1000, 90, Some("/r/fuzz/artifacts/host_api/crash-abc")));
    }

    #[test]
    fn bad_options_are_named() {
        let cache = std::env::temp_dir();
        let err = fuzz_command(&cache, ["nope".to_string()].into_iter()).unwrap_err().to_string();
        assert!(err.contains("\"nope\" is not a fuzz target") && err.contains("virtio_pci"), "{err}");
        let err = fuzz_command(&cache, ["--seconds".to_string(), "0".to_string()].into_iter()).unwrap_err().to_string();
        assert!(err.contains("--seconds \"0\""), "{err}");
    }
}
