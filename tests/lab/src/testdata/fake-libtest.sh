#!/bin/sh
# A stand-in for a libtest binary, for run-tests' own tests. lab_a passes; lab_b
# fails with a guest triple fault in its captured output, fails with a guest stalled
# inside KVM (the shim's words) on its first run alone, and passes on its second; with FAKE_PLAIN_FAILURE=1, lab_c fails
# for another reason. Runs are counted in $FAKE_COUNTER.
case "$*" in
*--exact*)
  n=$(cat "$FAKE_COUNTER" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE_COUNTER"
  echo "running 1 test"
  if [ "$n" -lt 2 ]; then
    echo "test lab_b ... FAILED"; echo; echo "failures:"; echo; echo "---- lab_b stdout ----"
    echo "Error: the agent did not answer within 120 s (no agent); the VMM's vCPU threads: vcpu0 in KVM_RUN (halted); every vCPU thread is in KVM_RUN or running: the VMM is not holding the guest back"
    echo; echo "failures:"; echo "    lab_b"
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s"
    exit 101
  fi
  echo "test lab_b ... ok"
  echo "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s"
  exit 0;;
esac
echo "running 3 tests"
echo "test lab_a ... ok"
echo "test lab_b ... FAILED"
[ "$FAKE_PLAIN_FAILURE" = 1 ] && echo "test lab_c ... FAILED"
echo; echo "failures:"; echo
echo "---- lab_b stdout ----"; echo "INFO vfvm-vmm: WARN the guest triple-faulted (KVM reset the vCPU)"
[ "$FAKE_PLAIN_FAILURE" = 1 ] && { echo; echo "---- lab_c stdout ----"; echo "assertion failed"; }
echo; echo "failures:"; echo "    lab_b"
if [ "$FAKE_PLAIN_FAILURE" = 1 ]; then
  echo "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"
else
  echo "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s"
fi
exit 101
