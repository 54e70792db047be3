#!/usr/bin/env python3
"""CPython `multiprocessing` side of the multiproc benchmark runner.

Usage: python3 mp_bench.py WORKLOAD [--budget SECONDS] [--quick]
       python3 mp_bench.py --list

Runs one workload and prints one JSON line on stdout:
    {"workload": ..., "unit": ..., "value": <median>, "samples": [...]}
or, when the workload cannot run, {"workload": ..., "error": "..."} with exit
status 1. Standard library only. Each workload is the Python twin of the
multiproc workload of the same name in crates/mp-bench (same message sizes,
same counts, same unit), so the runner can put the two side by side.

Sampling: a workload repeats timed samples until `budget` seconds have passed
(at least MIN_SAMPLES of them, unless one sample alone takes 3x the budget)
and reports the median. Throughput workloads first size their batches so that
one batch lasts about a fifth of the budget.
"""

import json
import os
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing import shared_memory

MIN_SAMPLES = 3
SMALL_MSG = b"\x01" * 8
BIG_MSG = b"\x02" * (64 * 1024)
MIB = 1024 * 1024
# Items of the chunksize=1 map: the 100 k, or 10 k in a --quick run.
CHUNKSIZE1_ITEMS = {False: 100_000, True: 10_000}
QUICK = False


# --------------------------------------------------------------------------
# sampling helpers (the Rust side has the same rules: crates/mp-bench/src/sampling.rs)
# --------------------------------------------------------------------------

def sample_for(budget, one_sample):
    """Call one_sample() (returning a figure) until the budget is spent."""
    samples = []
    start = time.perf_counter()
    while True:
        samples.append(one_sample())
        elapsed = time.perf_counter() - start
        if elapsed >= budget and len(samples) >= MIN_SAMPLES:
            break
        if elapsed >= 3 * budget:
            break
    return samples


def batch_size_for(budget, run_batch, start=1):
    """Smallest power-of-two multiple of `start` whose batch takes budget/5."""
    target = budget / 5
    k = start
    while True:
        took = run_batch(k)
        if took >= target or k >= 1 << 40:
            return k
        # Jump close to the target at once when the batch is far too short.
        scale = target / max(took, 1e-9)
        k = int(k * min(max(scale, 2.0), 64.0))


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# workers (module level so that every start method can find them)
# --------------------------------------------------------------------------

def noop():
    pass


def square(x):
    return x * x


def echo(data):
    return data


def echo_back(conn, data):
    conn.send_bytes(data)
    conn.close()


def echo_worker(conn):
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def bytes_sink_worker(conn):
    """Receives (count) then count byte messages, acknowledges each batch."""
    while True:
        count = conn.recv()
        if count is None:
            return
        received = 0
        for _ in range(count):
            received += len(conn.recv_bytes())
        conn.send(received)


def producer_worker(control, queue, item):
    while True:
        count = control.recv()
        if count is None:
            return
        for _ in range(count):
            queue.put(item)
        control.send(count)


def consumer_worker(control, queue):
    while True:
        count = control.recv()
        if count is None:
            return
        for _ in range(count):
            queue.get()
        control.send(count)


def counter_worker(control, counter):
    while True:
        count = control.recv()
        if count is None:
            return
        for _ in range(count):
            with counter.get_lock():
                counter.value += 1
        control.send(count)


def spin(n):
    """CPU-bound task: a pure-Python integer loop."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1000003
    return acc


# --------------------------------------------------------------------------
# workloads; each returns (unit, samples)
# --------------------------------------------------------------------------

def process_start(method, budget):
    ctx = mp.get_context(method)

    def one():
        t0 = time.perf_counter()
        p = ctx.Process(target=noop)
        p.start()
        p.join()
        return (time.perf_counter() - t0) * 1e3

    one()  # forkserver: starts the server; all: warms imports
    return "ms", sample_for(budget, one)


def program_exec(budget):
    """The reference row of spawn: posix_spawn + waitpid of this interpreter running
    `-c pass` (with site, as a spawned child's interpreter starts), no multiprocessing."""
    argv = [sys.executable, "-c", "pass"]

    def one():
        t0 = time.perf_counter()
        pid = os.posix_spawn(sys.executable, argv, os.environ)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{sys.executable} -c pass exited with {status:#x}")
        return (time.perf_counter() - t0) * 1e3

    one()
    return "ms", sample_for(budget, one)


def pipe_roundtrip(budget):
    here, there = mp.Pipe()
    child = mp.Process(target=echo_worker, args=(there,))
    child.start()
    msg = 0x0102030405060708

    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            here.send(msg)
            here.recv()
        return time.perf_counter() - t0

    try:
        k = batch_size_for(budget, run, start=16)
        samples = sample_for(budget, lambda: run(k) / k * 1e6)
    finally:
        here.send(None)
        child.join()
    return "us", samples


def pipe_throughput(budget):
    here, there = mp.Pipe()
    child = mp.Process(target=bytes_sink_worker, args=(there,))
    child.start()
    payload = b"\x03" * MIB

    def run(k):
        t0 = time.perf_counter()
        here.send(k)
        for _ in range(k):
            here.send_bytes(payload)
        got = here.recv()
        assert got == k * MIB, got
        return time.perf_counter() - t0

    try:
        k = batch_size_for(budget, run, start=4)
        samples = sample_for(budget, lambda: k * MIB / run(k) / 1e9)
    finally:
        here.send(None)
        child.join()
    return "GB/s", samples


def queue_throughput(producers, consumers, item, budget):
    """producers x consumers over one Queue; each consumer takes an equal share."""
    queue = mp.Queue()
    workers = []
    prod_ctl, cons_ctl = [], []
    for _ in range(producers):
        a, b = mp.Pipe()
        workers.append(mp.Process(target=producer_worker, args=(b, queue, item)))
        prod_ctl.append(a)
    for _ in range(consumers):
        a, b = mp.Pipe()
        workers.append(mp.Process(target=consumer_worker, args=(b, queue)))
        cons_ctl.append(a)
    for w in workers:
        w.start()
    total_per_batch = producers * consumers  # both divide it

    def run(k):
        per_producer = k * total_per_batch // producers
        per_consumer = k * total_per_batch // consumers
        t0 = time.perf_counter()
        for c in cons_ctl:
            c.send(per_consumer)
        for p in prod_ctl:
            p.send(per_producer)
        for c in cons_ctl:
            c.recv()
        took = time.perf_counter() - t0
        for p in prod_ctl:
            p.recv()
        return took

    try:
        k = batch_size_for(budget, run, start=64)
        items = k * total_per_batch
        if len(item) <= 8:
            samples = sample_for(budget, lambda: items / run(k) / 1e6)
            unit = "M msg/s"
        else:
            samples = sample_for(budget, lambda: items * len(item) / run(k) / 1e9)
            unit = "GB/s"
    finally:
        for c in prod_ctl + cons_ctl:
            c.send(None)
        for w in workers:
            w.join()
    return unit, samples


def per_op_ns(budget, op):
    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            op()
        return time.perf_counter() - t0

    k = batch_size_for(budget, run, start=1024)
    return "ns", sample_for(budget, lambda: run(k) / k * 1e9)


def lock_uncontended(budget):
    lock = mp.Lock()

    def op():
        lock.acquire()
        lock.release()

    return per_op_ns(budget, op)


def semaphore_uncontended(budget):
    sem = mp.Semaphore(1)

    def op():
        sem.acquire()
        sem.release()

    return per_op_ns(budget, op)


def value_increment(budget):
    value = mp.Value("q", 0)

    def op():
        with value.get_lock():
            value.value += 1

    return per_op_ns(budget, op)


def contended_counter(budget):
    counter = mp.Value("q", 0)
    ctl = []
    workers = []
    for _ in range(2):
        a, b = mp.Pipe()
        workers.append(mp.Process(target=counter_worker, args=(b, counter)))
        ctl.append(a)
    for w in workers:
        w.start()

    def run(k):
        before = counter.value
        t0 = time.perf_counter()
        for c in ctl:
            c.send(k)
        for c in ctl:
            c.recv()
        took = time.perf_counter() - t0
        assert counter.value - before == 2 * k, "lost increments"
        return took

    try:
        k = batch_size_for(budget, run, start=256)
        samples = sample_for(budget, lambda: 2 * k / run(k) / 1e6)
    finally:
        for c in ctl:
            c.send(None)
        for w in workers:
            w.join()
    return "M ops/s", samples


def shared_memory_round(budget):
    def run(k):
        t0 = time.perf_counter()
        for _ in range(k):
            seg = shared_memory.SharedMemory(create=True, size=MIB)
            other = shared_memory.SharedMemory(name=seg.name)
            other.close()
            seg.close()
            seg.unlink()
        return time.perf_counter() - t0

    k = batch_size_for(budget, run, start=8)
    return "us", sample_for(budget, lambda: run(k) / k * 1e6)


def pool_create(budget):
    """Pool(2), one apply (a worker surely up, as on the Rust side), close, join."""

    def one():
        t0 = time.perf_counter()
        pool = mp.Pool(2)
        pool.apply(square, (3,))
        pool.close()
        pool.join()
        return (time.perf_counter() - t0) * 1e3

    one()
    return "ms", sample_for(budget, one)


def pool_map(items, chunksize, unit_scale, budget):
    with mp.Pool(2) as pool:
        pool.map(square, range(1000))
        data = range(items)

        def one():
            t0 = time.perf_counter()
            out = pool.map(square, data, chunksize=chunksize)
            took = time.perf_counter() - t0
            assert len(out) == items and out[-1] == (items - 1) ** 2
            return items / took / unit_scale

        return sample_for(budget, one)


def pool_apply(budget):
    with mp.Pool(2) as pool:
        pool.apply(square, (3,))

        def run(k):
            t0 = time.perf_counter()
            for i in range(k):
                pool.apply(square, (i,))
            return time.perf_counter() - t0

        k = batch_size_for(budget, run, start=8)
        return "us", sample_for(budget, lambda: run(k) / k * 1e6)


def echo_1mib_process(budget):
    """A new process gets 1 MiB and returns it. Process has no return value, so the reply
    comes back over a Pipe; with the default start method (fork) the argument is inherited
    rather than sent, so only the reply crosses between processes."""

    def one():
        data = b"\x5a" * MIB
        t0 = time.perf_counter()
        receiver, sender = mp.Pipe(duplex=False)
        p = mp.Process(target=echo_back, args=(sender, data))
        p.start()
        sender.close()
        back = receiver.recv_bytes()
        p.join()
        took = time.perf_counter() - t0
        receiver.close()
        assert back == data
        return took * 1e3

    one()
    return "ms", sample_for(budget, one)


def echo_1mib_pool(budget):
    """1 MiB sent to a warm Pool(2) worker with apply and returned (pickled both ways)."""
    with mp.Pool(2) as pool:
        pool.apply(echo, (b"\x5a" * MIB,))

        def one():
            data = b"\x5a" * MIB
            t0 = time.perf_counter()
            back = pool.apply(echo, (data,))
            took = time.perf_counter() - t0
            assert back == data
            return took * 1e3

        return "ms", sample_for(budget, one)


def cpu_speedup(budget):
    """Serial vs Pool(2) on 8 equal CPU-bound tasks, paired repetitions."""
    tasks = 8
    task_secs = max(budget / 40, 0.002)
    n = 1000
    while timed(spin, n) < task_secs:
        n *= 2
    with mp.Pool(2) as pool:
        pool.map(spin, [1000] * 2, chunksize=1)

        def one():
            t0 = time.perf_counter()
            for _ in range(tasks):
                spin(n)
            serial = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.map(spin, [n] * tasks, chunksize=1)
            parallel = time.perf_counter() - t0
            return serial / parallel

        return "x", sample_for(budget, one)


WORKLOADS = {
    "process_start_fork": lambda b: process_start("fork", b),
    "process_start_forkserver": lambda b: process_start("forkserver", b),
    "process_start_spawn": lambda b: process_start("spawn", b),
    "program_exec": program_exec,
    "pipe_roundtrip": pipe_roundtrip,
    "pipe_1mib": pipe_throughput,
    "queue_1to1_8b": lambda b: queue_throughput(1, 1, SMALL_MSG, b),
    "queue_2to2_8b": lambda b: queue_throughput(2, 2, SMALL_MSG, b),
    "queue_1to1_64k": lambda b: queue_throughput(1, 1, BIG_MSG, b),
    "queue_2to2_64k": lambda b: queue_throughput(2, 2, BIG_MSG, b),
    "lock_uncontended": lock_uncontended,
    "semaphore_uncontended": semaphore_uncontended,
    "contended_counter": contended_counter,
    "value_increment": value_increment,
    "shared_memory_round": shared_memory_round,
    "pool_create": pool_create,
    "pool_map_1m": lambda b: ("M items/s", pool_map(1_000_000, None, 1e6, b)),
    "pool_map_chunksize1": lambda b: (
        "k items/s",
        pool_map(CHUNKSIZE1_ITEMS[QUICK], 1, 1e3, b),
    ),
    "pool_apply": pool_apply,
    "echo_1mib_process": echo_1mib_process,
    "echo_1mib_pool": echo_1mib_pool,
    "cpu_speedup": cpu_speedup,
}


def main(argv):
    if "--list" in argv:
        print("\n".join(WORKLOADS))
        return 0
    global QUICK
    budget = 0.5
    args = list(argv)
    if "--quick" in args:
        QUICK = True
        args.remove("--quick")
    if "--budget" in args:
        i = args.index("--budget")
        budget = float(args[i + 1])
        del args[i : i + 2]
    if len(args) != 1 or args[0] not in WORKLOADS:
        print(__doc__, file=sys.stderr)
        print("workloads: " + ", ".join(WORKLOADS), file=sys.stderr)
        return 2
    name = args[0]
    try:
        unit, samples = WORKLOADS[name](budget)
    except Exception as exc:  # reported as a row by the runner, not a crash
        print(json.dumps({"workload": name, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(
        json.dumps(
            {
                "workload": name,
                "unit": unit,
                "value": statistics.median(samples),
                "samples": samples,
                "python": sys.version.split()[0],
                "start_method": mp.get_start_method(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
