"""HyperQueue throughput driver for drover-bench.

HyperQueue's Python package ships no `hq` executable: `hyperqueue.cluster.LocalCluster` runs the
server and the workers as threads of the package's native module, inside this process. The
driver starts one such cluster with one worker offering `--cores` cores, then per run submits one
job of `--tasks` programs running `true` (stdout and stderr discarded, one core each, HyperQueue's
default) and times it from just before the submit until the server reports every task finished.

It talks to drover-bench through stdout, one JSON object per line:

    {"unavailable": REASON}              HyperQueue cannot run here; nothing else follows
    {"version": VERSION}                 the cluster is up
    {"run": K, "done": D, "secs": S}     run K: D tasks finished S seconds after the submit

Tracebacks and HyperQueue's own output (its server prints a table of its settings to stdout)
go to stderr. Everything the cluster writes lives under `--dir` and is removed on the way out.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# Seconds between two status requests. `Client.wait_for_jobs` asks once a second, too coarse for
# runs of a second or two; asking every 5 ms bounds the timing error at 5 ms per run.
POLL_INTERVAL = 0.005


class _NotDone(Exception):
    """Raised from the status callback to end a status request before its one-second sleep."""


# The protocol's stream: the process's stdout, until `main` moves it away from file descriptor 1.
protocol = sys.stdout


def emit(**fields):
    print(json.dumps(fields), file=protocol, flush=True)


def import_hyperqueue():
    """The modules the driver needs, or None after reporting why they cannot be loaded."""
    try:
        import hyperqueue
        from hyperqueue.cluster import LocalCluster, WorkerConfig
    except ImportError as e:
        # A missing package is ModuleNotFoundError for `hyperqueue` itself; anything else means
        # the package is there but its native module (server, worker, client) does not load.
        if isinstance(e, ModuleNotFoundError) and e.name == "hyperqueue":
            emit(unavailable="Python package hyperqueue not installed (pip install hyperqueue)")
        else:
            emit(unavailable=f"hyperqueue's native module does not load: {e}")
        return None
    return hyperqueue, LocalCluster, WorkerConfig


def job_status(connection, job_id):
    """One status request: the job's `finished`, `failed`, `total` and `completed`.

    `ClientConnection.wait_for_jobs` asks the server for the job's counters, hands them to the
    callback and, unless the job has ended, sleeps a second before asking again. The callback
    raising `_NotDone` ends the call right after the answer, so the caller picks the interval.
    """
    seen = {}

    def callback(jobs):
        seen.update(jobs[job_id])
        if not seen["completed"]:
            raise _NotDone()

    try:
        connection.wait_for_jobs([job_id], callback)
    except _NotDone:
        pass
    return seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--cores", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="seconds per run")
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()

    # HyperQueue's native code writes to file descriptor 1 as it likes; keep the protocol on a
    # copy of it and point descriptor 1 at stderr.
    global protocol
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    modules = import_hyperqueue()
    if modules is None:
        return
    hyperqueue, LocalCluster, WorkerConfig = modules

    # The harness starts the driver in a process group of its own, so its signals do not reach
    # here; a changed parent means it is gone, and the driver stops rather than run on alone.
    parent = os.getppid()
    root = tempfile.mkdtemp(prefix="hq-", dir=args.dir)
    # HyperQueue leaves a socket (`hq-lc-*`) in the temp dir for every cluster it ran; pointing
    # TMPDIR into `root` makes it go with the rest.
    os.environ["TMPDIR"] = root
    clusters = 0

    def start_cluster():
        nonlocal clusters
        clusters += 1
        server_dir = os.path.join(root, f"server-{clusters}")
        os.makedirs(server_dir)
        return LocalCluster(server_dir=server_dir, worker_config=WorkerConfig(cores=args.cores))

    cluster = None
    try:
        cluster = start_cluster()
        client = cluster.client()
        emit(version=hyperqueue.get_version().lstrip("v"))
        for run in range(1, args.runs + 1):
            # The job is described before the clock starts, as Drover's job file is compiled
            # before it; turning it into the submit message is part of the submit.
            job = hyperqueue.Job()
            for _ in range(args.tasks):
                job.program(["true"], cwd=args.dir, stdout=None, stderr=None)
            start = time.perf_counter()
            job_id = client.submit(job).id
            status = job_status(client.connection, job_id)
            while not status["completed"]:
                if time.perf_counter() - start > args.deadline:
                    break
                if os.getppid() != parent:
                    sys.exit("drover-bench went away")
                time.sleep(POLL_INTERVAL)
                status = job_status(client.connection, job_id)
            secs = time.perf_counter() - start
            if status["failed"]:
                raise RuntimeError(f"run {run}: {status['failed']} of {args.tasks} tasks failed")
            emit(run=run, done=status["finished"], secs=secs)
            if not status["completed"] and run < args.runs:
                # The Python API cannot cancel a job: a fresh cluster drops what is left, so
                # the next run does not compete with it.
                cluster.stop()
                # Stopping twice raises: should the new cluster not start, `finally` must not
                # stop the old one again.
                cluster = None
                cluster = start_cluster()
                client = cluster.client()
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
