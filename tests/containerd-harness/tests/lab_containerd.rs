//! The runc baseline, against both containerd release lines the shim supports: the
//! harness's private containerd imports the registry-free test images and runs them
//! with runc; exit codes and output come back, signals reach the container, and
//! nothing is left behind. Also prints the median `ctr run` time of busybox `true`
//! (the baseline a later vfvm benchmark compares with). These run inside the lab's L2
//! machine (`cargo xtask test` runs every `lab_*` test there), never on the host.

use std::time::{Duration, Instant};
use vfvm_test_containerd::oci::{BUSYBOX_REF, PAUSE_REF};
use vfvm_test_containerd::{pids_named, Containerd, Version};

/// Runs of busybox `true` the median is taken over.
const TIMED_RUNS: usize = 5;
/// Generous: everything in L2 runs under TCG.
const TASK_DEADLINE: Duration = Duration::from_secs(120);

fn runc_baseline(version: Version) {
    let ctd = Containerd::start(version).expect("starting a private containerd");
    let name = version.name();
    // The project's snippet is part of the config: the CRI plugin must load with it.
    let cri = ctd.plugin_status(version.cri_runtime_plugin()).unwrap();
    assert_eq!(
        cri,
        "ok",
        "containerd {name}: {} did not load with configs/containerd's snippet:\n{}",
        version.cri_runtime_plugin(),
        ctd.log()
    );
    let (images, import_took) = ctd.import_test_images().unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", ctd.log()));
    eprintln!("containerd {name}: imported {} images in {:.2}s", images.len(), import_took.as_secs_f64());
    let runc_root = ctd.runc_root().to_string_lossy().into_owned();

    // Output and exit code come back through ctr.
    let out = ctd.ctr_output(&["run", "--rm", "--runc-root", &runc_root, BUSYBOX_REF, "t1", "sh", "-c", "echo hello; exit 7"]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "containerd {name}: ctr run should exit with the container's 7; stdout {stdout:?}, stderr {:?}\ncontainerd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    assert_eq!(stdout.trim(), "hello", "containerd {name}: container output");

    // The pause image runs detached until SIGTERM, then exits 0.
    let mut events = ctd.events().unwrap();
    ctd.ctr_ok(&["run", "-d", "--runc-root", &runc_root, PAUSE_REF, "p1"]).unwrap();
    events.wait_for("/tasks/start", "p1", Instant::now() + TASK_DEADLINE).unwrap();
    ctd.ctr_ok(&["tasks", "kill", "-s", "SIGTERM", "p1"]).unwrap();
    let exit = events.wait_for("/tasks/exit", "p1", Instant::now() + TASK_DEADLINE).unwrap();
    drop(events);
    // Protobuf JSON leaves a zero exit status out.
    assert!(
        !exit.contains("\"exit_status\":") || exit.contains("\"exit_status\":0"),
        "containerd {name}: pause should exit 0 on SIGTERM: {exit}"
    );
    ctd.ctr_ok(&["tasks", "delete", "p1"]).unwrap();
    ctd.ctr_ok(&["containers", "rm", "p1"]).unwrap();
    assert_eq!(ctd.ctr_ok(&["tasks", "ls", "-q"]).unwrap().trim(), "", "containerd {name}: tasks left");
    assert_eq!(ctd.ctr_ok(&["containers", "ls", "-q"]).unwrap().trim(), "", "containerd {name}: containers left");

    // The runc baseline: whole `ctr run --rm` of busybox `true`, as a user sees it.
    let mut times = Vec::new();
    for n in 0..TIMED_RUNS {
        let id = format!("bench{n}");
        let started = Instant::now();
        ctd.ctr_ok(&["run", "--rm", "--runc-root", &runc_root, BUSYBOX_REF, &id, "true"]).unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let median = times[TIMED_RUNS / 2];
    let all: Vec<String> = times.iter().map(|t| format!("{:.2}", t.as_secs_f64())).collect();
    eprintln!(
        "containerd {name}: runc `ctr run --rm busybox true`: median {:.2}s over {TIMED_RUNS} runs (sorted: {}s)",
        median.as_secs_f64(),
        all.join(", ")
    );

    let dir = ctd.dir().to_path_buf();
    let socket = ctd.socket();
    ctd.stop().unwrap();
    let shims = pids_named("containerd-shim-runc-v2");
    assert!(shims.is_empty(), "containerd {name}: containerd-shim-runc-v2 processes left: {shims:?}");
    let mounts = vfvm_test_containerd::mounts_under(&dir);
    assert!(mounts.is_empty(), "containerd {name}: mounts left under {}: {mounts:?}", dir.display());
    assert!(!dir.exists() && !socket.exists(), "containerd {name}: {} left behind", dir.display());
    assert!(pids_named("containerd").is_empty(), "containerd {name}: a containerd is still running");
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_containerd_1_6_runs_runc_containers_and_cleans_up() {
    runc_baseline(Version::V1_6);
}

#[test]
#[ignore = "needs the lab: run by cargo xtask test"]
fn lab_containerd_2_1_runs_runc_containers_and_cleans_up() {
    runc_baseline(Version::V2_1);
}
