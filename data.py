"""The data: Stanford Alpaca's template and records (github.com/tatsu-lab/stanford_alpaca: an instruction, an
optional input, the response to learn), the built-in demo tasks, a tokenizer for them, the batches of each step.
Only the response and its EOS are targets; the prompt carries no loss.
"""
import io
import json
import os
import random
import string

import torch


class DataError(Exception):  # a problem with the data or a flag's value: the scripts print it as one line and exit
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
    """Alpaca JSON (a list of objects) or JSONL (one object per line), checked record by record."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot read ({e})")
    records = []
    if text.lstrip().startswith("["):  # one JSON list: decode element by element to name the broken record
        decoder, pos = json.JSONDecoder(), text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                break
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"--data {path}: record {len(records) + 1} is not valid JSON "
                                f"({e.msg}, line {e.lineno})")
            records.append(record)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"--data {path}: record {len(records) + 1} (line {lineno}) is not valid JSON "
                                    f"({e.msg})")
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


# --- the built-in tasks: small questions with checkable answers, from a lookup that one layer can do to
# sorting and counting, which take an answer of several tokens; each draws (input, answer) from a random.Random

def spaced(items) -> str:
    return " ".join(str(x) for x in items)


def next_letter(r):
    letter = r.choice(string.ascii_lowercase[:-1])
    return letter, chr(ord(letter) + 1)


def parity(r):
    n = r.randint(0, 999)
    return str(n), "even" if n % 2 == 0 else "odd"


def last_letter(r):
    letters = r.choices(string.ascii_lowercase, k=r.randint(3, 8))
    return spaced(letters), letters[-1]


def largest_digit(r):
    digits = r.choices(range(10), k=r.randint(3, 8))
    return spaced(digits), str(max(digits))


def sort_digits(r):
    digits = r.sample(range(10), r.randint(4, 8))  # distinct digits
    return spaced(digits), spaced(sorted(digits))


def count(r):
    first = r.randint(0, 90)
    last = first + r.randint(2, 8)
    return f"{first} to {last}", spaced(range(first, last + 1))


TASKS = {  # name: (instruction, how to draw an input and its answer, share of the training mix)
    "next": ("Which letter comes next in the alphabet?", next_letter, 1),
    "parity": ("Is the number even or odd?", parity, 1),
    "last": ("What is the last letter?", last_letter, 1),
    "max": ("Which digit is the largest?", largest_digit, 1),
    # the demo's 3 minutes go mostly where they are needed: sorting, and counting, where knowing when to stop
    # is the last thing a small model learns
    "sort": ("Sort the digits in increasing order.", sort_digits, 2),
    "count": ("Count from the first number to the second.", count, 6),
}


def builtin_records(n: int, seed: int, evenly: bool = False) -> list[dict]:
    """n examples of TASKS in the shares of the training mix (evenly: as many of each), the same for a seed."""
    rng = random.Random(seed)
    cycle = [task for task, (_, _, share) in TASKS.items() for _ in range(1 if evenly else share)]
    records = []
    for i in range(n):
        task = cycle[i % len(cycle)]
        instruction, draw, _ = TASKS[task]
        inp, out = draw(rng)
        records.append({"instruction": instruction, "input": inp, "output": out, "task": task})
    rng.shuffle(records)
    return records


# --- a pretraining corpus in miniature: plain text stating what the tasks ask, without the instruction template,
# so that a base model knows the facts and fine-tuning teaches it to answer (the paper's setting: a pretrained
# LLaMA 2, fine-tuned on instructions)

def alphabet_run(r) -> str:
    first = r.randrange(22)
    letters = string.ascii_lowercase[first:first + r.randint(4, 10)]
    return f"The alphabet from {letters[0]} to {letters[-1]}: {spaced(letters)}."


def corpus(n: int, seed: int, sentences: int = 6) -> list[dict]:
    """n documents of a few sentences each, in the tasks' shares and alphabet runs, as records {"text": ...}; the
    same for the same seed."""
    templates = {  # task: how one of its (input, answer) pairs reads as a sentence
        "next": "In the alphabet, {} is followed by {}.", "parity": "The number {} is {}.",
        "last": "The last letter of {} is {}.", "max": "The largest of the digits {} is {}.",
        "sort": "The digits {} in increasing order are {}.", "count": "Counting from {}: {}."}
    rng = random.Random(seed)
    cycle = [task for task, (_, _, share) in TASKS.items() for _ in range(share)] + ["alphabet"]
    documents = []
    for _ in range(n):
        lines = []
        for _ in range(sentences):
            task = rng.choice(cycle)
            lines.append(alphabet_run(rng) if task == "alphabet" else templates[task].format(*TASKS[task][1](rng)))
        documents.append({"text": "\n".join(lines)})
    return documents


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


# --- tokenizer and tokens

def train_tokenizer(records: list[dict], vocab_size: int, path: str):
    """A small LLaMA-style sentencepiece BPE (unk 0, bos 1, eos 2, digits split, byte fallback), written to path.
    The template's MARKERS are single tokens, so that a tiny model spends its compute on the instruction and the
    input, and so is a digit after a space ("▁7", two tokens for LLaMA): "1 2 4 7 9" is one token a step of sorting.
    """
    import sentencepiece as spm
    texts = [r["text"] if "text" in r else alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            split_digits=True, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
            hard_vocab_limit=False,
            user_defined_symbols=[m.replace(" ", "\u2581") for m in MARKERS] + [f"\u2581{d}" for d in range(10)])
    except RuntimeError as e:  # e.g. fewer pieces than the 256 bytes + characters need
        raise DataError(f"--vocab_size {vocab_size}: sentencepiece refused ({str(e).split('] ')[-1][:200]})")
    atomic_write(path, buf.getvalue())


def atomic_write(path: str, data: bytes):
    """Write to a temporary name, flush it to disk, then rename: a reader sees the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
