"""Several worker processes race on the same jobs: each job runs exactly once.

Four workers (separate processes, as with a job queue that delivers every job
to more than one consumer) each go through all twelve payout jobs in their own
order, sharing one SQLite ledger file. Every payout is sent once; the other
workers are blocked. The ledger lives in a temporary folder that is removed at
the end. Run: python examples/multiprocess_workers.py
"""

import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter

from ledger import Guard

JOBS = range(1, 13)
WORKERS = 4


def send_payout(job_id: int, effects: str) -> str:
    time.sleep(0.02)  # a slow API call, so the workers really overlap
    with open(effects, "a") as log:  # the side effect: one line per payout sent
        log.write(f"{job_id}\n")
    return f"payout {job_id} sent by worker {os.getpid()}"


def work(worker: int, folder: str) -> Counter:
    guard = Guard(os.path.join(folder, "ledger.db"))
    effects = os.path.join(folder, "effects.log")
    jobs = list(JOBS)
    random.Random(worker).shuffle(jobs)
    seen = Counter()
    for job_id in jobs:
        # key= names the call by its job: a retry is the same call whatever else is passed
        outcome = guard.execute(send_payout, job_id, effects, key=f"payout-{job_id}")
        seen[outcome.source] += 1
    guard.close()
    return seen


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
            per_worker = pool.starmap(work, [(w, folder) for w in range(WORKERS)])
        for worker, seen in enumerate(per_worker):
            print(f"worker {worker}: ran {seen['executed']}, blocked {seen['blocked']}")
        with open(os.path.join(folder, "effects.log")) as log:
            sent = Counter(int(line) for line in log)
    print(f"payouts sent: {sum(sent.values())} for {len(JOBS)} jobs; "
          f"each exactly once: {all(sent[j] == 1 for j in JOBS)}")
