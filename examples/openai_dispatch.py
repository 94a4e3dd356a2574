"""A plain OpenAI-style tool loop: tool_map[name](**json.loads(arguments)).

This is the loop most hand-written agents run over chat-completions tool calls.
A scripted model (no network, no API key) sends the same charge twice in one
turn, retries it in the next, and calls a payment API that fails once. The
card is charged once; the failed call runs again when retried, because only
successes are final. The charge passes current_key() to the payment API as its
idempotency key, so even a crash between the charge and the ledger's record
could not charge twice. Run: python examples/openai_dispatch.py
"""

import json

from ledger import Guard, current_key

guard = Guard(":memory:")  # records in memory: this example leaves no files behind


class PaymentAPI:
    """Stands in for a payment provider that honours Idempotency-Key headers."""

    def __init__(self) -> None:
        self.charges: dict[str, float] = {}
        self.outages = 1

    def charge(self, amount: float, idempotency_key: str) -> str:
        if self.outages:
            self.outages -= 1
            raise ConnectionError("payment provider timed out")
        self.charges.setdefault(idempotency_key, amount)  # a repeated key is not charged again
        return f"ch_{len(self.charges)}"


payments = PaymentAPI()


def charge_card(customer: str, amount: float) -> dict:
    charge_id = payments.charge(amount, idempotency_key=current_key())
    return {"charge": charge_id, "amount": amount}


def lookup_customer(customer: str) -> dict:
    return {"customer": customer, "plan": "pro"}


guard.policy(lookup_customer, unlimited=True)  # read-only: runs every time, keeps no record
# A dropped connection leaves open whether the card was charged; the provider deduplicates on
# the key, so the retry may run (the default, uncertain=UNCERTAIN_ERRORS, would stop it as UNKNOWN).
guard.policy(charge_card, uncertain=())
tool_map = guard.wrap_tools({"charge_card": charge_card, "lookup_customer": lookup_customer},
                            blocked_return={"status": "already done"})


def tool_call(n: int, name: str, **arguments) -> dict:
    return {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


SCRIPT = [  # what the model asks for, turn by turn
    [tool_call(1, "lookup_customer", customer="cus_42")],
    [tool_call(2, "charge_card", customer="cus_42", amount=99.0)],             # the provider times out
    [tool_call(3, "charge_card", customer="cus_42", amount=99.0),              # the retry, and a
     tool_call(4, "charge_card", amount=99.0, customer="cus_42")],             # duplicate in one turn
    [tool_call(5, "charge_card", customer="cus_42", amount=99.0000000001)],    # float drift
]


def dispatch(call: dict) -> str:
    function = call["function"]
    try:
        result = tool_map[function["name"]](**json.loads(function["arguments"]))
    except ConnectionError as error:
        result = {"error": str(error)}
    return json.dumps(result)


if __name__ == "__main__":
    for turn in SCRIPT:
        for call in turn:
            print(f"{call['function']['name']}({call['function']['arguments']}) -> {dispatch(call)}")
    print("charges at the provider:", list(payments.charges.values()))
    stats = guard.stats()
    print(f"executed {stats['executed']}, blocked {stats['blocked']}")
