"""Write the project's own small instruction and preference sets (data/sft_instructions.jsonl,
data/dpo_preferences.jsonl), deterministically.

The default model only continues Shakespeare: after ``[INST] Greet Romeo. [/INST]`` it writes
more play. The instruction set asks for four short courtly replies, each with a fixed shape
and the name from the prompt:

    Greet NAME.                -> Good morrow, NAME!
    Bid NAME farewell.         -> Farewell, NAME!
    Thank NAME.                -> I thank you, NAME.
    Call for NAME.             -> What, ho, NAME!

Names are Shakespeare characters; the held-out split uses names never seen in training, so a
model that answers them in shape has learned the format, not the examples.

The preference set (for DPO) keeps the same prompts and prefers a courteous answer, with
"gentle" before the name ("Good morrow, gentle NAME!"), over the curt one the instruction set
taught ("Good morrow, NAME!").

    python scripts/make_finetune_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"

NAMES = (
    "Romeo Juliet Richard Henry Edward Clarence Warwick Petruchio Katharina Lucentio Bianca Tranio "
    "Prospero Miranda Angelo Isabella Escalus Leontes Hermione Paulina Polixenes Camillo Buckingham "
    "York Northumberland Bolingbroke Mowbray Gaunt Mercutio Tybalt Benvolio Capulet Montague Sicinius "
    "Brutus Volumnia Aufidius Cominius Menenius Coriolanus Vincentio Baptista Gremio Hortensio Grumio "
    "Lucio Claudio Mariana Florizel Perdita Clifford Margaret Elizabeth Anne Rivers Hastings Stanley "
    "Catesby Norfolk Surrey Oxford Richmond Gloucester Lancaster Somerset Paris Lawrence Sampson Gregory "
    "Balthasar Antonio Sebastian Gonzalo Ferdinand Emilia"
).split()

# task: (user phrasings, answer, regular expression of the answer's shape)
TASKS = {
    "greet": (("Greet {n}.", "Say good morrow to {n}."), "Good morrow, {n}!", r"Good morrow, {n}!"),
    "farewell": (("Bid {n} farewell.", "Say farewell to {n}."), "Farewell, {n}!", r"Farewell, {n}!"),
    "thank": (("Thank {n}.", "Give thanks to {n}."), "I thank you, {n}.", r"I thank you, {n}\."),
    "call": (("Call for {n}.", "Summon {n}."), "What, ho, {n}!", r"What, ho, {n}!"),
}
NAME_PATTERN = r"[A-Z][a-z]+"
# DPO prefers the courteous answer: the same reply with "gentle" before the name.
COURTEOUS = "gentle {n}"
N_TEST_NAMES = 12


def main() -> None:
    rng = random.Random(2023)
    names = list(NAMES)
    assert len(set(names)) == len(names)
    rng.shuffle(names)
    test_names, train_names = set(names[:N_TEST_NAMES]), names[N_TEST_NAMES:]
    sft, dpo = [], []
    for name in names:
        split = "test" if name in test_names else "train"
        for task, (phrasings, answer, pattern) in TASKS.items():
            user = rng.choice(phrasings).format(n=name)
            plain, courteous = answer.format(n=name), answer.format(n=COURTEOUS.format(n=name))
            sft.append({
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": plain}],
                "task": task, "pattern": pattern.format(n=NAME_PATTERN), "split": split,
            })
            dpo.append({
                "prompt": [{"role": "user", "content": user}], "chosen": courteous, "rejected": plain,
                "task": task, "pattern": pattern.format(n=COURTEOUS.format(n=NAME_PATTERN)), "split": split,
            })
    for path, rows in ((DATA / "sft_instructions.jsonl", sft), (DATA / "dpo_preferences.jsonl", dpo)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{path.relative_to(DATA.parent)}: {len(rows)} rows "
              f"({sum(r['split'] == 'train' for r in rows)} train, {sum(r['split'] == 'test' for r in rows)} test)")


if __name__ == "__main__":
    main()
