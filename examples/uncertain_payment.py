"""Uncertain outcomes: verify with the payment provider before charging again.

The provider here does NOT deduplicate on the idempotency key, but it can be asked
whether a charge with a given key exists. Order 7 is charged in three attempts:

1. The provider does not answer: TimeoutError. Did the charge happen? Unknown: the
   call is recorded UNKNOWN, and no duplicate may run it until someone finds out.
2. A worker process retries. The ledger asks the verifier first: no charge under the
   key, so NOT_DONE, and the tool runs (same key). The charge goes through, and the
   worker is SIGKILLed before the ledger records it.
3. After the dead worker's lease runs out, the next attempt takes the call over. The
   verifier finds the charge under the key: Done(charge). It is recorded as the call's
   result, and nothing runs.

Exactly one charge, counted in the provider's append-only file. Run:
python examples/uncertain_payment.py
"""
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import tempfile
import time

from ledger import NOT_DONE, Done, Guard, current_key

LEASE = 1.0   # seconds before a dead worker's call may be taken over


class PaymentAPI:
    """A payment provider's fake: one JSON line per charge, in an append-only file, which
    can be searched by idempotency key (as Stripe's and Adyen's APIs can)."""

    def __init__(self, path: str) -> None:
        self.path = pathlib.Path(path)

    def charge(self, order: int, amount: float, idempotency_key: str) -> dict:
        charge = {"id": f"ch_{len(self.charges()) + 1}", "order": order, "amount": amount, "key": idempotency_key}
        with open(self.path, "a") as f:
            f.write(json.dumps(charge) + "\n")
        return charge

    def charges(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def find(self, idempotency_key: str) -> dict | None:
        return next((c for c in self.charges() if c["key"] == idempotency_key), None)


NETWORK = {"timeouts": 0, "die_after_charge": False}   # the faults of this process's next attempt


def payments(folder: str) -> tuple[Guard, PaymentAPI, object]:
    """The guard, the provider and the guarded charge_card tool, as every process sets them up."""
    guard, api = Guard(os.path.join(folder, "ledger.db"), quiet=True), PaymentAPI(os.path.join(folder, "charges"))

    def charge_card(order: int, amount: float) -> dict:
        if NETWORK["timeouts"]:
            NETWORK["timeouts"] -= 1
            raise TimeoutError("the payment provider did not answer within 10 s")
        charge = api.charge(order, amount, idempotency_key=current_key())
        if NETWORK["die_after_charge"]:
            os.kill(os.getpid(), signal.SIGKILL)   # the worker dies before the ledger records the charge
        return charge

    def verify(key: str, arguments: dict):
        """Asked before any run that could charge twice: did the run under `key` charge?"""
        charge = api.find(key)
        print(f"  verifier in {'worker' if NETWORK['die_after_charge'] else 'main'}: "
              f"{'done, ' + charge['id'] if charge else 'not done'}", flush=True)
        return Done(charge) if charge else NOT_DONE

    guard.policy("charge_card", lease=LEASE, verify=verify)
    return guard, api, guard.once(charge_card, name="charge_card")


def worker(folder: str) -> None:
    NETWORK["die_after_charge"] = True
    payments(folder)[2](7, 49.0)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        guard, api, charge_card = payments(folder)

        NETWORK["timeouts"] = 1
        try:
            charge_card(7, 49.0)
        except TimeoutError as e:
            print(f"attempt 1: {type(e).__name__}: {e}")
        [record] = guard.history()
        print(f"the call is {record['status']}: no retry runs it before the verifier is asked")

        spawned = multiprocessing.get_context("spawn").Process(target=worker, args=(folder,))
        spawned.start()
        spawned.join()
        died = "killed by SIGKILL" if spawned.exitcode == -signal.SIGKILL else f"exit {spawned.exitcode}"
        print(f"attempt 2: the worker charged, then was {died} before the ledger recorded it; "
              f"charges at the provider: {len(api.charges())}")

        time.sleep(LEASE)   # the dead worker's lease runs out
        while (outcome := guard.execute(charge_card, 7, 49.0)).source == "blocked":
            time.sleep(0.1)   # renewed once before the worker died: a little longer
        print(f"attempt 3: {outcome.source}, ran again: {outcome.ran}, returns {outcome.value['id']}")
        print(f"attempt 4: {guard.execute(charge_card, 7, 49.0).source}")

        charges = api.charges()
        print(f"charges at the provider: {len(charges)} ({', '.join(c['id'] for c in charges)})")
        if len(charges) != 1:
            sys.exit("order 7 was charged more than once")
        guard.close()


if __name__ == "__main__":
    main()
