//! `vfvm-vf`: the VF manager from the command line, for operators and tests.
//!
//! `discover` shows what a pod's VFs are (and changes nothing), `prepare` hands them to
//! vfio-pci as the shim does, `restore` gives back everything in a sandbox's journal:
//! the recovery entry point after a crash.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

use vfvm_shim::vf::{discover::discover, Sysfs, VfManager};

const USAGE: &str = "\
usage:
  vfvm-vf discover --netns PATH [--env KEY=VALUE]... [--cni-cache DIR]
  vfvm-vf prepare  --sandbox ID --state-dir DIR --netns PATH [--env KEY=VALUE]... [--lock-dir DIR] [--cni-cache DIR] [--hold]
  vfvm-vf restore  --sandbox ID --state-dir DIR [--lock-dir DIR]

prepare --hold keeps the VFs (and their locks) until SIGTERM or SIGINT, then restores them.
--state-dir is the sandbox's journal directory: the shim's is <state_dir>/<sandbox>
(/run/vfvm/<sandbox>), so `restore` there gives back what a crashed shim left.
Defaults: --lock-dir /run/vfvm/vf-locks, --cni-cache /var/lib/cni/sriov.";

#[derive(Default)]
struct Args {
    netns: Option<PathBuf>,
    env: Vec<String>,
    sandbox: Option<String>,
    state_dir: Option<PathBuf>,
    lock_dir: Option<PathBuf>,
    cni_cache: Option<PathBuf>,
    hold: bool,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Args> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--netns" => a.netns = Some(value()?.into()),
            "--env" => {
                let v = value()?;
                if !v.contains('=') {
                    bail!("--env {v:?}: expected KEY=VALUE");
                }
                a.env.push(v)
            }
            "--sandbox" => a.sandbox = Some(value()?),
            "--state-dir" => a.state_dir = Some(value()?.into()),
            "--lock-dir" => a.lock_dir = Some(value()?.into()),
            "--cni-cache" => a.cni_cache = Some(value()?.into()),
            "--hold" => a.hold = true,
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(a)
}

impl Args {
    fn need<T: Clone>(v: &Option<T>, flag: &str) -> Result<T> {
        v.clone().with_context(|| format!("{flag} is required\n\n{USAGE}"))
    }

    fn manager(&self) -> Result<VfManager> {
        let sandbox = Self::need(&self.sandbox, "--sandbox")?;
        let state = Self::need(&self.state_dir, "--state-dir")?;
        let locks = self.lock_dir.clone().unwrap_or_else(|| "/run/vfvm/vf-locks".into());
        Ok(VfManager::new(&sandbox, &state, &locks))
    }

    fn cni_cache(&self) -> PathBuf {
        self.cni_cache.clone().unwrap_or_else(|| vfvm_shim::vf::cni_cache::DEFAULT_DIR.into())
    }
}

/// Blocks until SIGTERM or SIGINT (blocked first, so none is lost to the default action).
fn wait_for_termination() -> Result<i32> {
    // SAFETY: plain signal-mask calls on a local, zeroed sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGTERM/SIGINT failed");
        }
        let mut sig = 0;
        if libc::sigwait(&set, &mut sig) != 0 {
            bail!("sigwait failed");
        }
        Ok(sig)
    }
}

fn run(cmd: &str, a: Args) -> Result<()> {
    match cmd {
        "discover" => {
            let netns = Args::need(&a.netns, "--netns")?;
            let records = discover(&Sysfs::default(), &netns, &a.env, &a.cni_cache(), a.sandbox.as_deref().unwrap_or("-"))?;
            println!("{}", serde_json::to_string_pretty(&records)?);
        }
        "prepare" => {
            let m = a.manager()?;
            let netns = Args::need(&a.netns, "--netns")?;
            let records = discover(&m.sysfs, &netns, &a.env, &a.cni_cache(), &m.sandbox_id)?;
            let mut prepared = Vec::new();
            for record in &records {
                match m.prepare(record) {
                    Ok(vf) => {
                        println!("prepared {} iommu_group {} {}", vf.addr, vf.iommu_group, vf.vfio_group_path.display());
                        prepared.push(vf);
                    }
                    Err(e) => {
                        let (restored, _) = m.restore_all_locked(prepared.into_iter().map(|p| p.lock).collect());
                        tracing::info!("gave back the VFs prepared before the failure: {restored:?}");
                        return Err(e).with_context(|| format!("preparing VF {}", record.vf.addr));
                    }
                }
            }
            println!("ready: {} VF(s) on vfio-pci", prepared.len());
            if a.hold {
                let sig = wait_for_termination()?;
                tracing::info!("signal {sig}: giving the VFs back");
                let (restored, _) = m.restore_all_locked(prepared.into_iter().map(|p| p.lock).collect());
                restored?;
                println!("restored");
            }
        }
        "restore" => {
            // Each VF under its lock: a sandbox still alive holds it, and keeps its VFs.
            let m = a.manager()?;
            let (restored, _) = m.restore_all_locked(Vec::new());
            println!("restored {} VF(s)", restored?);
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = parse(args).and_then(|a| {
        let span = tracing::info_span!("vf", sandbox = a.sandbox.as_deref().unwrap_or("-"));
        let _enter = span.enter();
        run(&cmd, a)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfvm-vf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
