"""Local lm-eval tasks built from the bundled synthetic task set (no download needed).

* ``dllm_mc``: multiple choice: the prompt of a held-out example and 4 candidate answers, the
  correct one, a near miss (one item changed) and the answers of two other examples of the same
  task; metric ``acc``.
* ``dllm_gen``: generation (``generate_until``) of the answers, metric ``exact_match``;
* ``dllm_ppl``: perplexity (``loglikelihood_rolling``) of held-out "prompt\\nanswer" documents;
  metrics word/byte perplexity and bits per byte.

``write_local_tasks(directory)`` writes the YAML files and their JSONL data (absolute paths), for
``--include_path directory``. The tasks do not render a chat template: run lm-eval with
``--apply_chat_template`` (and a ``tokenizer``) for chat models such as the bundled tiny ones.
"""

from __future__ import annotations

import json
import random
import string
from collections import defaultdict
from pathlib import Path

from dllm_serve.bench.tasks import heldout_examples

MC_TASK = "dllm_mc"
PPL_TASK = "dllm_ppl"
GEN_TASK = "dllm_gen"


def _near_miss(answer: str, rng: random.Random) -> str:
    """The answer with one item replaced by another of the same kind (digit, lower, upper)."""
    items = answer.split(" ")
    i = rng.randrange(len(items))
    item = items[i]
    alphabet = next(
        (a for a in (string.digits, string.ascii_lowercase, string.ascii_uppercase) if item in a),
        string.ascii_lowercase,
    )
    items[i] = rng.choice([c for c in alphabet if c != item])
    return " ".join(items)


def mc_documents(n: int, seed: int = 0) -> list[dict]:
    """``n`` multiple-choice documents: question, 4 choices, gold index."""
    pool = heldout_examples(3 * n)
    by_task = defaultdict(list)
    for ex in pool:
        by_task[ex.task].append(ex)
    rng = random.Random(seed)
    docs = []
    for ex in pool[:n]:
        others = [o.answer for o in by_task[ex.task] if o.answer != ex.answer]
        wrong = [_near_miss(ex.answer, rng), *rng.sample(others, 2)]
        choices = [ex.answer, *wrong]
        rng.shuffle(choices)
        docs.append({"question": ex.prompt, "choices": choices, "gold": choices.index(ex.answer)})
    return docs


def ppl_documents(n: int) -> list[dict]:
    return [{"text": f"{ex.prompt}\n{ex.answer}"} for ex in heldout_examples(n)]


def _task_yaml(name: str, data: Path, body: list[str]) -> str:
    head = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
    ]
    return "\n".join(head + body) + "\n"


def write_local_tasks(directory: str | Path, n: int = 100) -> Path:
    """Write both tasks (``n`` documents each) under ``directory``; returns it."""
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mc_data, ppl_data = out / f"{MC_TASK}.jsonl", out / f"{PPL_TASK}.jsonl"
    gen_data = out / f"{GEN_TASK}.jsonl"
    mc_data.write_text("".join(json.dumps(d) + "\n" for d in mc_documents(n)))
    gen_data.write_text(
        "".join(json.dumps({"question": ex.prompt, "answer": ex.answer}) + "\n" for ex in heldout_examples(n))
    )
    ppl_data.write_text("".join(json.dumps(d) + "\n" for d in ppl_documents(n)))
    mc = [
        "output_type: multiple_choice",
        'doc_to_text: "{{question}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    ppl = [
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "    aggregation: weighted_perplexity",
        "    higher_is_better: false",
        "  - metric: byte_perplexity",
        "    aggregation: weighted_perplexity",
        "    higher_is_better: false",
        "  - metric: bits_per_byte",
        "    aggregation: bits_per_byte",
        "    higher_is_better: false",
    ]
    gen = [
        "output_type: generate_until",
        'doc_to_text: "{{question}}"',
        'doc_to_target: "{{answer}}"',
        "generation_kwargs:",
        '  until: ["\\n"]',
        "  max_gen_toks: 48",
        "metric_list:",
        "  - metric: exact_match",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    (out / f"{MC_TASK}.yaml").write_text(_task_yaml(MC_TASK, mc_data, mc))
    (out / f"{GEN_TASK}.yaml").write_text(_task_yaml(GEN_TASK, gen_data, gen))
    (out / f"{PPL_TASK}.yaml").write_text(_task_yaml(PPL_TASK, ppl_data, ppl))
    return out
