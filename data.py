"""The data: Stanford Alpaca's template and records (github.com/tatsu-lab/stanford_alpaca: an instruction, an
optional input, the response to learn), the split held out, the tokens of each example and the batches of each step.
Only the response and its EOS are targets; the prompt carries no loss. The built-in demo tasks are in tasks.py.
"""
import json
import os
import random

import torch

from tasks import builtin_records, corpus


class DataError(Exception):  # a problem with the data: the scripts print it as one line and exit
    pass


# --- the Alpaca template

PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n")
PREAMBLE_NO_INPUT = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.\n\n")
INSTRUCTION, INPUT, RESPONSE = "### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n"
PROMPT_INPUT = PREAMBLE_INPUT + INSTRUCTION + "{instruction}" + INPUT + "{input}" + RESPONSE
PROMPT_NO_INPUT = PREAMBLE_NO_INPUT + INSTRUCTION + "{instruction}" + RESPONSE
# the fixed strings of the template, each one token of the demo tokenizer (as a chat template's markers are)
MARKERS = [PREAMBLE_INPUT + INSTRUCTION, PREAMBLE_NO_INPUT + INSTRUCTION, INPUT, RESPONSE]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    return (PROMPT_INPUT if input else PROMPT_NO_INPUT).format(instruction=instruction, input=input)


# --- records

def load_records(path: str) -> list[dict]:
    """Alpaca JSON (a list of objects) or JSONL (one object per line), each record checked for its fields."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot read ({e})")
    one_list, records, lineno = text.lstrip().startswith("["), [], 0
    try:
        if one_list:
            records = json.loads(text)
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    records.append(json.loads(line))
    except json.JSONDecodeError as e:
        raise DataError(f"--data {path}: not valid JSON at line {e.lineno if one_list else lineno} ({e.msg})")
    if not isinstance(records, list):
        raise DataError(f"--data {path}: expected a list of records")
    for i, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"--data {path}: record {i} is not an object with instruction, input, output")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"--data {path}: record {i} lacks a string field '{key}'")
        if not isinstance(record.get("input", ""), str):
            raise DataError(f"--data {path}: record {i} has a non-string 'input'")
    if not records:
        raise DataError(f"--data {path}: the dataset is empty")
    return records


def dataset(path: str | None, val_size: int, num_examples: int, pretrain: bool = False):
    """(train, held-out) records: the built-in tasks (num_examples in the training mix, val_size apart with as many of
    each task), or those of the file at `path` (file_split), or with pretrain documents of the built-in corpus."""
    if pretrain:
        return corpus(num_examples, seed=1234), corpus(val_size, seed=4321)
    if path:
        return file_split(load_records(path), val_size)
    return builtin_records(num_examples, seed=1234), builtin_records(val_size, seed=4321, evenly=True)


def file_split(records: list[dict], val_size: int):
    """A fixed permutation, the same for any seed, and at most a tenth held out."""
    split = random.Random(1234).sample(range(len(records)), len(records))
    n_val = min(val_size, len(records) // 10)
    return [records[i] for i in split[n_val:]], [records[i] for i in split[:n_val]]


def held_out(train_config: dict, data: str | None = None) -> list[dict]:
    """The records a training run with this configuration (a checkpoint's train_config) kept for validation,
    or those `data` would give. A pretrained base (--pretrain) is scored on the built-in instruction tasks it
    has not been tuned on, not on its held-out documents."""
    path = data if data is not None else train_config.get("data")
    return dataset(path, train_config.get("val_size", 256), train_config.get("num_examples", 32000))[1]


# --- tokens

def tokenize(records: list[dict], tokenizer, max_seq_len: int):
    """((ids, n_prompt) per record: BOS + templated prompt, then response + EOS; a {"text"} of the pretraining
    corpus is all response), and how many were truncated and dropped."""
    examples, truncated, dropped = [], 0, 0
    for r in records:
        if "text" in r:
            prompt, answer = [tokenizer.bos_id], r["text"]
        else:
            prompt = tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", "")), bos=True)
            answer = r["output"]
        ids = prompt + tokenizer.encode(answer, bos=False, eos=True)
        if len(prompt) >= max_seq_len:  # no response token would be left to learn from
            dropped += 1
            continue
        truncated += len(ids) > max_seq_len
        examples.append((ids[:max_seq_len], len(prompt)))
    return examples, truncated, dropped


def n_targets(example) -> int:
    return len(example[0]) - example[1]


# --- batches

def collate(examples, device):
    """Pad to the longest in the batch; labels are the next token, -100 on the prompt and the padding."""
    T = max(len(ids) for ids, _ in examples) - 1
    tokens = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        ids = torch.tensor(ids)
        tokens[i, :len(ids) - 1] = ids[:-1]
        labels[i, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]  # predict the response tokens only
    return tokens.to(device), labels.to(device)


def batch_tensors(examples, device):
    """tokens (B, T), the flat positions (N,) of the response tokens and the tokens they predict (N,), on device
    (the positions found on the CPU, so that no boolean mask makes the GPU wait)."""
    tokens, labels = collate(examples, "cpu")
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    return tokens.to(device), positions.to(device), labels.view(-1)[positions].to(device)


def step_batches(examples, step: int, batch_size: int, grad_accum: int, seed: int, rank: int, world: int):
    """(this rank's micro-batches for a step, the global batch's target count): a pure function of the step, so that
    a resumed run sees what an uninterrupted one would; each epoch a permutation drawn from seed + epoch."""
    global_batch = batch_size * grad_accum * world
    epoch, i = divmod(step, len(examples) // global_batch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    chosen = [examples[j] for j in order[i * global_batch:(i + 1) * global_batch]]
    micro = [chosen[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size] for m in range(grad_accum)]
    return micro, sum(n_targets(e) for e in chosen)
