"""The course's exercises: what the learner writes in each notebook, and a checker that says why
an answer is wrong.

    from llama_edu.exercises import EXERCISES, check
    EXERCISES["rotate_half"].task        # what to write; .notebook, .signature, .reference
    check("rotate_half", my_rotate_half) # True/False, and a printed diagnosis

``check`` runs the learner's function and the reference (always the package's own function, never a
copy) on the exercise's inputs: random ones and adversarial ones chosen to separate near-misses
(tiny norms, fp16 overflow, ties, a cache offset). When an answer differs it runs the exercise's
known mistakes on the same inputs; a mistake that reproduces the learner's every output (or error)
is named, with a hint. Otherwise it tries the reference on the case's arguments changed the way
code misuses them (an argument left out, inverted, off by one, another ``dim``, ``dtype`` ignored,
two swapped, a config field such as ``num_key_value_heads`` misread): one that reproduces every
answer names the argument. Then it says what differs (shape, dtype, NaN, sign, a constant factor,
axes swapped or reversed, values in the wrong places, a count off by whole blocks of the model). ``check`` never raises (only ``KeyboardInterrupt`` goes
through): a broken answer must not stop the notebook. Each call gets its own copies of the inputs
and a time limit, and an answer that changes its inputs in place is told so (``checking.py``
explains how). ``check(name, None)``, or a function that raises ``NotImplementedError``, is "not
attempted yet".

How to add an exercise (one self-contained block; copy one of those below)
--------------------------------------------------------------------------
In the module of your notebook (``nbNN_topic.py`` in this package), import the reference from its
package module and write::

    def _my_cases():                 # fresh inputs each call: [(label, args), ...]
        g = torch.Generator().manual_seed(0)
        return [("random 3x4", (torch.randn(3, 4, generator=g),)),
                ("fp16 values that overflow x**2", (torch.full((2, 4), 300.0).half(),))]

    register(
        "my_fn", "12_lora", "(x)", "one line saying what to write",
        reference=package_module.my_fn,
        cases=_my_cases,
        mistakes=[  # (a wrong version, the mistake in words, a hint); matched by running it
            (lambda x: ..., "the mistake it makes", "how to fix it"),
        ],
    )

``tests/test_exercises.py`` then checks it automatically (the reference passes, each mistake is
rejected with its own diagnosis, a stub is "not attempted yet"); in your own test file add that a
correct answer written differently passes: ``assert check("my_fn", my_alternative)``. A mistake
must be told apart by the inputs: if two mistakes give the same outputs, the first is named, so
add the input that separates them. Optional arguments: ``atol``/``rtol`` for float comparisons (``tolerance=lambda args: (atol,
rtol)`` where a correct formula's rounding grows with the input),
``also=fn`` for a check the values cannot show (``also(learner_fn) -> problem or None``; see
greedy_decode). Draw random inputs from ``_gen(seed)``: the grader's ``held_out(k)`` then shifts
the seeds, so graded answers meet values the notebook never showed. In a notebook: ``check("my_fn", my_fn)`` under the learner's cell, and
``assert check("my_fn", my_fn_solution)`` in the hidden solution cell.
"""


from .checking import DEFAULT_TIMEOUT, EXERCISES, Exercise, Raised, TimedOut, Verdict, check, check_function, difference, held_out, list_exercises, register

# Each notebook's module registers its exercises when imported.
from . import nb00_course_map, nb01_tokenizer, nb02_embeddings_and_rmsnorm, nb03_rope, nb04_attention, nb05_feedforward_and_block, nb06_full_model, nb07_loading_real_weights, nb08_generation, nb09_chat, nb10_pretraining, nb11_classification, nb12_lora, nb13_instruction_tuning_and_dpo, nb14_quantization, nb16_beyond_one_machine, nb17_shipping_it, nb18_llama2_to_llama3  # noqa: F401  (registration)

__all__ = ["DEFAULT_TIMEOUT", "EXERCISES", "Exercise", "Raised", "TimedOut", "Verdict", "held_out", "check", "check_function", "difference", "list_exercises", "register"]
