"""Write the demo task: sentence -> one-line JSON extraction (deterministic; run to regenerate).

Each row asks the model to pull a person's name, age, city and job out of a sentence and answer
with exactly one line of JSON: keys in the order name, age, city, job; lowercase strings; age an
integer. SmolLM2-135M-Instruct knows the idea but not the convention (it answers with multi-line
JSON, capitalised values, extra prose), so its exact match starts near 0 and a few minutes of
LoRA on two CPU cores lifts it clearly. All names, places and jobs are synthetic combinations.

    python data/make_demo_data.py            # writes data/demo/extraction.jsonl (3000 rows)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["maria", "james", "aisha", "kenji", "lucas", "sofia", "omar", "elena", "david", "priya", "liam",
         "chen", "fatima", "noah", "ingrid", "mateo", "yuki", "grace", "ivan", "zara", "tomas", "leila",
         "samuel", "hana", "oscar", "nadia", "felix", "amara", "jonas", "rosa"]
LAST = ["lopez", "smith", "khan", "tanaka", "silva", "rossi", "haddad", "petrova", "cohen", "sharma",
        "murphy", "wang", "ali", "becker", "larsen", "garcia", "sato", "okafor", "novak", "ahmed",
        "dubois", "moreau", "jensen", "kim", "fischer", "costa", "nowak", "mensah", "berg", "reyes"]
CITIES = ["lisbon", "toronto", "nairobi", "osaka", "lyon", "denver", "krakow", "porto", "austin", "seoul",
          "dublin", "accra", "bergen", "valencia", "leeds", "perth", "tampere", "cordoba", "graz", "quito"]
JOBS = ["nurse", "carpenter", "teacher", "pilot", "chef", "architect", "plumber", "journalist", "baker",
        "electrician", "librarian", "pharmacist", "engineer", "gardener", "translator", "dentist",
        "photographer", "mechanic", "accountant", "firefighter"]
TEMPLATES = [
    "{Name} is a {age}-year-old {job} who lives in {City}.",
    "Meet {Name}, {age}, a {job} based in {City}.",
    "After years of training, {Name} now works as a {job} in {City} at the age of {age}.",
    "{City} is home to {Name}, a {job} aged {age}.",
    "At {age}, {Name} moved to {City} to start a new job as a {job}.",
    "Our new neighbour, {Name}, is {age} years old and works as a {job} here in {City}.",
    "{Name} ({age}) has been a {job} in {City} for a while now.",
    "The {job} {Name}, {age} years old, was born and raised in {City}.",
    "Yesterday I met {Name} in {City}, who is {age} and works as a {job}.",
    "Local {job} {Name} from {City} turns {age} this year.",
    "{Name}, a {job}, celebrated turning {age} with friends in {City}.",
    "In {City}, {age}-year-old {Name} runs a small business as a {job}.",
]
INSTRUCTION = ("Extract the person's name, age, city and job from the sentence. Answer with one line of "
               'JSON with the keys "name", "age", "city", "job" in that order, lowercase strings.')


def make_row(rng: random.Random) -> dict[str, str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age, city, job = rng.randint(19, 79), rng.choice(CITIES), rng.choice(JOBS)
    sentence = rng.choice(TEMPLATES).format(Name=name.title(), City=city.title(), age=age, job=job)
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job})
    return {"instruction": INSTRUCTION, "input": sentence, "output": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo" / "extraction.jsonl")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for _ in range(args.rows):
            f.write(json.dumps(make_row(rng)) + "\n")
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
