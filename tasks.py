"""The demo's built-in tasks: six small instruction tasks with checkable answers (next letter, parity, last letter,
largest digit, sorting digits, counting), drawn as Alpaca records; a pretraining corpus in miniature stating the same
facts as plain sentences; and exact-match scoring of an answer.
"""
import random
import string


# --- the tasks: small questions with checkable answers, from a lookup that one layer can do to
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
