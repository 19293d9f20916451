"""Shared helpers for the pytest suite."""
import os, signal, subprocess, sys, tempfile, time

def run_torchrun(script, *args, nproc=2, timeout=300, cwd=None, env=None):
    """Run `script` under `torch.distributed.run` on CPU ranks; return a CompletedProcess.

    Output goes through temporary files, not pipes, and on a timeout torchrun gets SIGTERM first (it then stops
    its workers, which run in their own sessions), then SIGKILL: a hung rank can never hang the test run.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try: p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.send_signal(signal.SIGTERM)
            try: p.wait(timeout=30)
            except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait()
            subprocess.run(["pkill", "-KILL", "-f", str(script)], check=False)
        out.seek(0); err.seek(0)
        r = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    if timed_out: r.stderr += f"\n[run_torchrun] stopped after {timeout} s"
    return r

def run_ranks(tmp_path, worker_src, cwd=None, timeout=300):
    "Run a 2-rank worker script in `tmp_path`; check it succeeded; return each rank's saved weights and JSON record."
    import json, torch
    (tmp_path / "worker.py").write_text(worker_src)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    r = run_torchrun(tmp_path / "worker.py", tmp_path, cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    weights = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    records = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert records[0]["world"] == records[1]["world"] == 2
    for k in weights[0]: assert torch.equal(weights[0][k], weights[1][k]), f"ranks differ in {k}"
    return weights, records
