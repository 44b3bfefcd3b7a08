"""Tool families for general tool-use training episodes: plain Python tools and scripted questions.

Every family is a set of tools (typed functions with a one-line docstring, so LangChain's ``@tool``
and LlamaIndex's ``FunctionTool.from_defaults`` wrap them as a user's own tools would be) and question
makers. A question maker draws a question from a seeded ``random.Random`` and returns a
:class:`Script`: the question, the calls an ideal agent makes (arguments copied from the question, in
the tool's signature order) and a function that states the final answer in words from the results.

The families (arithmetic, unit conversion, small tables of invented entities, JSON records, dates,
string tools, search over a small invented handbook) have nothing to do with logs, and none of them is
used by the held-out agent evaluation (``flashback_agents/evaluation/agent_questions.py`` and ``agent_tools.py``), whose tools
and phrasings are written separately by hand. Values are invented (fictional products, cities, people),
so an answer can only be right by reading the tool result.
"""

from __future__ import annotations

import datetime as _dt
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------- invented entities

_SYL = ["ka", "lo", "mir", "ten", "vas", "dor", "el", "bri", "sun", "ha", "ro", "gal", "pe", "nor", "qui", "za",
        "fen", "tal", "wy", "os", "mar", "lin", "ber", "cas", "ti", "ven", "dal", "ru", "sel", "ob"]


def _word(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n or rng.choice((2, 2, 3)))).capitalize()


def _seeded(key: str) -> random.Random:
    """A generator that depends only on ``key``: a table lookup gives the same value every time."""
    return random.Random(sum((i + 1) * ord(c) for i, c in enumerate(key.lower().strip())) * 7919 + len(key))


_PRODUCT_KINDS = ["lamp", "kettle", "backpack", "chair", "headphones", "notebook", "blender", "tent", "mug",
                  "keyboard", "umbrella", "desk", "scarf", "speaker", "jacket", "bicycle bell", "clock", "vase"]
_DEPARTMENTS = ["Finance", "Sales", "Engineering", "Legal", "Marketing", "Support", "Research", "Facilities"]
_PLANS = ["free", "basic", "pro", "team", "enterprise"]
_STATUSES = {"invoice": ["paid", "unpaid", "overdue", "cancelled"],
             "ticket": ["open", "closed", "pending", "in progress"]}
_PRIORITIES = ["low", "medium", "high", "urgent"]
_FIRST = ["Ana", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jonas", "Kemi", "Lea",
          "Mateo", "Nora", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Yusuf", "Zoe"]
_LAST = ["Alvarez", "Brandt", "Costa", "Dimitrov", "Eriksen", "Fischer", "Grant", "Horvat", "Ibsen", "Jansen",
         "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Sato", "Tanaka"]


def _money(x: float) -> float:
    return round(x, 2)


def _num(x: float) -> int | float:
    """A number as a person writes it: whole numbers without ``.0``, others to at most 4 decimals."""
    x = round(float(x), 4)
    return int(x) if x == int(x) else x


# ----------------------------------------------------------------------------- tools
# arithmetic

def add(a: float, b: float) -> float:
    """Add two numbers."""
    return _num(a + b)


def subtract(a: float, b: float) -> float:
    """Subtract b from a."""
    return _num(a - b)


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return _num(a * b)


def divide(a: float, b: float) -> float:
    """Divide a by b."""
    if b == 0:
        return "Error: division by zero"  # type: ignore[return-value]
    return _num(a / b)


def power(base: float, exponent: int) -> float:
    """Raise base to the power exponent."""
    return _num(base ** exponent)


def square_root(x: float) -> float:
    """Square root of a number."""
    if x < 0:
        return "Error: negative number"  # type: ignore[return-value]
    return _num(math.sqrt(x))


def percentage(percent: float, value: float) -> float:
    """Compute percent % of value."""
    return _num(percent * value / 100)


# the same operations under the names and argument names users give them (a model must read the
# tool list, not remember one spelling)

def plus(x: int, y: int) -> int:
    """Add two integers."""
    return x + y


def sum_numbers(a: float, b: float) -> float:
    """Return the sum of a and b."""
    return _num(a + b)


def mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def times(x: float, y: float) -> float:
    """Return x times y."""
    return _num(x * y)


def minus(a: int, b: int) -> int:
    """Return a minus b."""
    return a - b


def div(numerator: float, denominator: float) -> float:
    """Divide numerator by denominator."""
    if denominator == 0:
        return "Error: division by zero"  # type: ignore[return-value]
    return _num(numerator / denominator)


#: operation -> (tool name, its two argument names)
ARITH_NAMES: dict[str, list[tuple[str, tuple[str, str]]]] = {
    "add": [("add", ("a", "b")), ("plus", ("x", "y")), ("sum_numbers", ("a", "b"))],
    "multiply": [("multiply", ("a", "b")), ("mul", ("a", "b")), ("times", ("x", "y"))],
    "subtract": [("subtract", ("a", "b")), ("minus", ("a", "b"))],
    "divide": [("divide", ("a", "b")), ("div", ("numerator", "denominator"))],
}
_OPS = {"add": lambda a, b: a + b, "multiply": lambda a, b: a * b, "subtract": lambda a, b: a - b}


# unit conversion
_LENGTH = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mm": 0.001, "miles": 1609.344, "mile": 1609.344, "ft": 0.3048,
           "feet": 0.3048, "inches": 0.0254, "inch": 0.0254, "yards": 0.9144}
_WEIGHT = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "lbs": 0.45359237, "pounds": 0.45359237, "oz": 0.028349523,
           "ounces": 0.028349523, "tonnes": 1000.0}


def _convert(table: dict[str, float], value: float, from_unit: str, to_unit: str) -> Any:
    f, t = from_unit.strip().lower(), to_unit.strip().lower()
    if f not in table or t not in table:
        return f"Error: unknown unit; use one of {', '.join(sorted(table))}"
    return round(value * table[f] / table[t], 2)


def convert_length(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a length between units (km, m, cm, mm, miles, ft, inches, yards)."""
    return _convert(_LENGTH, value, from_unit, to_unit)


def convert_weight(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a weight between units (kg, g, lb, oz, tonnes)."""
    return _convert(_WEIGHT, value, from_unit, to_unit)


# tables of invented entities (deterministic per name)

def get_product_price(product: str) -> str:
    """Look up the price of a product in the shop catalogue."""
    r = _seeded("price:" + product)
    return f"{product}: {_money(r.uniform(4, 400)):.2f} USD"


def get_employee(name: str) -> dict:
    """Look up an employee in the company directory."""
    r = _seeded("emp:" + name)
    return {"name": name, "department": r.choice(_DEPARTMENTS), "extension": str(r.randint(1000, 9899)),
            "office": f"{r.randint(1, 9)}{r.choice('ABCD')}"}


def get_city_population(city: str) -> str:
    """Population of a city."""
    r = _seeded("pop:" + city)
    return f"{city} has {r.randint(12, 950) * 1000 + r.randint(0, 999):,} inhabitants"


# JSON records

def get_user_profile(user_id: str) -> dict:
    """Fetch a user's profile by user id."""
    r = _seeded("user:" + user_id)
    first, last = r.choice(_FIRST), r.choice(_LAST)
    return {"user_id": user_id, "name": f"{first} {last}", "email": f"{first.lower()}.{last.lower()}@example.com",
            "plan": r.choice(_PLANS), "joined": f"20{r.randint(15, 24)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"}


def get_invoice(invoice_id: str) -> dict:
    """Fetch an invoice record by invoice id."""
    r = _seeded("inv:" + invoice_id)
    return {"invoice_id": invoice_id, "amount": _money(r.uniform(20, 5000)), "currency": "USD",
            "status": r.choice(_STATUSES["invoice"]),
            "due_date": f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"}


def get_ticket(ticket_id: str) -> dict:
    """Fetch a support ticket by ticket id."""
    r = _seeded("tkt:" + ticket_id)
    return {"ticket_id": ticket_id, "subject": f"{r.choice(['Login', 'Billing', 'Export', 'Sync', 'Upload'])} "
            f"{r.choice(['fails', 'is slow', 'shows an error', 'stopped working'])}",
            "priority": r.choice(_PRIORITIES), "status": r.choice(_STATUSES["ticket"]),
            "assignee": f"{r.choice(_FIRST)} {r.choice(_LAST)}"}


# dates

def _date(text: str) -> _dt.date | str:
    try:
        return _dt.date.fromisoformat(text.strip())
    except ValueError:
        return "Error: dates must be written YYYY-MM-DD"


def day_of_week(date: str) -> str:
    """Weekday of a date given as YYYY-MM-DD."""
    d = _date(date)
    return d if isinstance(d, str) else d.strftime("%A")


def add_days(date: str, days: int) -> str:
    """The date a number of days after a date (YYYY-MM-DD)."""
    d = _date(date)
    return d if isinstance(d, str) else (d + _dt.timedelta(days=int(days))).isoformat()


def days_between(start: str, end: str) -> int:
    """Number of days from start to end (dates as YYYY-MM-DD)."""
    a, b = _date(start), _date(end)
    if isinstance(a, str):
        return a  # type: ignore[return-value]
    if isinstance(b, str):
        return b  # type: ignore[return-value]
    return (b - a).days


# strings

def to_uppercase(text: str) -> str:
    """Convert text to upper case."""
    return text.upper()


def count_letters(text: str, letter: str) -> int:
    """Count how often a letter occurs in a text (case-insensitive)."""
    return text.lower().count(letter.lower()) if letter else 0


def reverse_text(text: str) -> str:
    """Reverse a text character by character."""
    return text[::-1]


def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


# search over a small invented handbook
_HANDBOOK = {
    "parking": "Staff parking is in garage B; permits are issued by Facilities on the first Monday of each month.",
    "holidays": "Every employee has 27 days of paid holiday per year; up to 5 unused days carry over to March.",
    "expenses": "Expense claims must be filed within 30 days with receipts; meals are reimbursed up to 40 USD a day.",
    "laptops": "Laptops are replaced every 4 years; request a new one through the IT portal under 'Hardware'.",
    "remote work": "Remote work is allowed 3 days a week after the probation period of 6 months.",
    "security": "Badges must be worn at all times; a lost badge is reported to security at extension 4400.",
    "training": "Each employee has a training budget of 1200 USD per year, approved by their manager.",
    "canteen": "The canteen on floor 2 is open from 11:30 to 14:30; the salad bar closes at 14:00.",
    "gym": "The gym in the basement is free for staff and open from 6:00 to 22:00 on weekdays.",
    "mail": "Outgoing mail leaves the mail room at 15:00; parcels need a cost centre number.",
    "bikes": "Bike racks are behind building C; showers are on floor 1 next to the gym lockers.",
    "printing": "Colour printing costs 10 cents a page and is charged to the team's cost centre.",
}


def search_docs(query: str) -> str:
    """Search the company handbook; returns the most relevant passages."""
    words = {w.strip("?.,!").lower() for w in query.split() if len(w) > 2}
    scored = sorted(_HANDBOOK.items(), key=lambda kv: -sum(w in (kv[0] + " " + kv[1]).lower() for w in words))
    return "\n".join(f"[{k}] {v}" for k, v in scored[:2])


# records that hold a quantity in one unit (the source of a lookup-then-convert chain)

def get_crate(crate_id: str) -> dict:
    """Fetch a warehouse crate record by crate id."""
    r = _seeded("crate:" + crate_id)
    return {"crate_id": crate_id, "contents": r.choice(["books", "tiles", "glassware", "tools", "fabric", "tea"]),
            "weight_kg": round(r.uniform(3, 240), 1), "aisle": f"{r.choice('ABCDEFG')}{r.randint(1, 30)}"}


def get_trail(trail: str) -> dict:
    """Look up a hiking trail by name."""
    r = _seeded("trail:" + trail)
    return {"trail": trail, "length_km": round(r.uniform(2, 60), 1), "elevation_gain_m": r.randint(50, 1800),
            "difficulty": r.choice(["easy", "moderate", "hard"])}


TOOLS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    add, subtract, multiply, divide, power, square_root, percentage, plus, sum_numbers, mul, times, minus, div, convert_length, convert_weight,
    get_product_price, get_employee, get_city_population, get_user_profile, get_invoice, get_ticket,
    day_of_week, add_days, days_between, to_uppercase, count_letters, reverse_text, word_count, search_docs,
    get_crate, get_trail)}

FAMILIES: dict[str, list[str]] = {
    "arithmetic": ["add", "subtract", "multiply", "divide", "power", "square_root", "percentage", "plus",
                   "sum_numbers", "mul", "times", "minus", "div"],
    "units": ["convert_length", "convert_weight"],
    "tables": ["get_product_price", "get_employee", "get_city_population"],
    "records": ["get_user_profile", "get_invoice", "get_ticket"],
    "dates": ["day_of_week", "add_days", "days_between"],
    "strings": ["to_uppercase", "count_letters", "reverse_text", "word_count"],
    "search": ["search_docs"],
}
FAMILY_OF = {t: fam for fam, names in FAMILIES.items() for t in names}
#: tools of no family: bound only in lookup-then-convert chains (:func:`q_lookup_chain`), never distractors
CHAIN_SOURCES = [t for t in TOOLS if t not in FAMILY_OF]


# ----------------------------------------------------------------------------- scripts

@dataclass
class Script:
    """One scripted episode: the question, the ideal calls (each may depend on earlier results) and the
    final answer in words."""

    question: str
    tools: list[str]
    #: each step returns (tool name, arguments) given the results so far
    calls: list[Callable[[list[Any]], tuple[str, dict]]] = field(default_factory=list)
    answer: Callable[[list[Any]], str] = lambda results: ""
    kind: str = "single"


def _call(tool_name: str, **args: Any) -> Callable[[list[Any]], tuple[str, dict]]:
    return lambda results: (tool_name, dict(args))


def _pick(rng: random.Random, options: list[str], **fmt: Any) -> str:
    return rng.choice(options).format(**fmt)


def _n(rng: random.Random, lo: int = 2, hi: int = 99) -> int:
    return rng.randint(lo, hi)


def _say(x: Any) -> str:
    return str(x)


def q_arithmetic(rng: random.Random) -> Script:
    op = rng.choice(["add", "subtract", "multiply", "divide", "power", "square_root", "percentage"])
    a, b = _n(rng, 2, 999), _n(rng, 2, 99)
    if op in ARITH_NAMES:
        name, (ka, kb) = rng.choice(ARITH_NAMES[op])
        step = lambda results: (name, {ka: a, kb: b})  # noqa: E731
    if op == "add":
        q = _pick(rng, ["What is {a} plus {b}?", "Add {a} and {b}.", "What's {a} + {b}?", "Compute the sum of {a} "
                        "and {b}.", "what do i get if i add {b} to {a}?"], a=a, b=b)
        return Script(q, [name], [step], lambda r: _pick(rng, [
            "{a} plus {b} is {r}.", "The sum of {a} and {b} is {r}.", "{a} + {b} = {r}."], a=a, b=b, r=r[0]))
    if op == "subtract":
        q = _pick(rng, ["What is {a} minus {b}?", "Subtract {b} from {a}.", "What's {a} - {b}?",
                        "How much is left if I take {b} away from {a}?"], a=a, b=b)
        return Script(q, [name], [step], lambda r: _pick(rng, [
            "{a} minus {b} is {r}.", "{a} - {b} = {r}."], a=a, b=b, r=r[0]))
    if op == "multiply":
        q = _pick(rng, ["What is {a} times {b}?", "Multiply {a} by {b}.", "What's {a} * {b}?",
                        "Calculate {a} multiplied by {b}.", "what is the product of {a} and {b}"], a=a, b=b)
        return Script(q, [name], [step], lambda r: _pick(rng, [
            "{a} times {b} is {r}.", "{a} multiplied by {b} is {r}.", "{a} * {b} = {r}."], a=a, b=b, r=r[0]))
    if op == "divide":
        q = _pick(rng, ["What is {a} divided by {b}?", "Divide {a} by {b}.", "What's {a} / {b}?",
                        "How much is {a} split into {b} equal parts?"], a=a, b=b)
        return Script(q, [name], [step], lambda r: _pick(rng, [
            "{a} divided by {b} is {r}.", "{a} / {b} = {r}."], a=a, b=b, r=r[0]))
    if op == "power":
        base, exp = rng.randint(2, 12), rng.randint(2, 6)
        q = _pick(rng, ["What is {a} to the power of {b}?", "Raise {a} to the power {b}.", "What's {a}^{b}?"],
                  a=base, b=exp)
        return Script(q, ["power"], [_call("power", base=base, exponent=exp)], lambda r: _pick(rng, [
            "{a} to the power of {b} is {r}.", "{a}^{b} = {r}."], a=base, b=exp, r=r[0]))
    if op == "square_root":
        x = rng.choice([rng.randint(2, 40) ** 2, rng.randint(2, 5000)])
        q = _pick(rng, ["What is the square root of {x}?", "Find the square root of {x}.", "sqrt of {x}?"], x=x)
        return Script(q, ["square_root"], [_call("square_root", x=x)], lambda r: _pick(rng, [
            "The square root of {x} is {r}.", "√{x} = {r}."], x=x, r=r[0]))
    pct, val = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), _n(rng, 20, 2000)
    q = _pick(rng, ["What is {p}% of {v}?", "Calculate {p} percent of {v}.", "How much is {p}% of {v}?"], p=pct, v=val)
    return Script(q, ["percentage"], [_call("percentage", percent=pct, value=val)], lambda r: _pick(rng, [
        "{p}% of {v} is {r}.", "{p} percent of {v} is {r}."], p=pct, v=val, r=r[0]))


def q_units(rng: random.Random) -> Script:
    if rng.random() < 0.5:
        f, t = rng.sample(["km", "miles", "m", "ft", "cm", "inches"], 2)
        v = rng.choice([rng.randint(1, 500), round(rng.uniform(1, 100), 1)])
        q = _pick(rng, ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?",
                        "{v} {f} to {t}, please."], v=v, f=f, t=t)
        name = "convert_length"
    else:
        f, t = rng.sample(["kg", "lb", "g", "oz"], 2)
        v = rng.choice([rng.randint(1, 300), round(rng.uniform(1, 50), 1)])
        q = _pick(rng, ["Convert {v} {f} to {t}.", "How many {t} are {v} {f}?", "What is {v} {f} in {t}?"],
                  v=v, f=f, t=t)
        name = "convert_weight"
    return Script(q, [name], [_call(name, value=v, from_unit=f, to_unit=t)], lambda r: _pick(rng, [
        "{v} {f} is {r} {t}.", "{v} {f} equals {r} {t}.", "That is {r} {t}."], v=v, f=f, t=t, r=r[0]))


def _product(rng: random.Random) -> str:
    return f"{_word(rng)} {rng.choice(_PRODUCT_KINDS)}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _price_of(result: str) -> str:
    return result.split(": ", 1)[-1]


def _price_value(result: str) -> float:
    """The number of a ``get_product_price`` result ("Tiro clock: 383.42 USD": 383.42)."""
    return float(_price_of(result).split()[0])


def q_tables(rng: random.Random) -> Script:
    kind = rng.choice(["price", "employee", "population"])
    if kind == "price":
        p = _product(rng)
        q = _pick(rng, ["How much does the {p} cost?", "What is the price of the {p}?", "Price of {p}?",
                        "Can you check what the {p} costs?"], p=p)
        return Script(q, ["get_product_price"], [_call("get_product_price", product=p)], lambda r: _pick(rng, [
            "The {p} costs {x}.", "The price of the {p} is {x}."], p=p, x=_price_of(r[0])))
    if kind == "employee":
        who = _person(rng)
        field_, words = rng.choice([("department", "department"), ("extension", "phone extension"),
                                    ("office", "office")])
        q = _pick(rng, ["What is {w}'s {f}?", "Which {f} is {w} in?" if field_ == "department" else
                        "What {f} does {w} have?", "Look up the {f} of {w}."], w=who, f=words)
        return Script(q, ["get_employee"], [_call("get_employee", name=who)], lambda r: _pick(rng, [
            "{w}'s {f} is {x}.", "{w}: {f} {x}."], w=who, f=words, x=r[0][field_] if isinstance(r[0], dict) else r[0]))
    city = _word(rng, 3) + rng.choice(["", " Falls", "burg", "ton", " Bay"])
    q = _pick(rng, ["What is the population of {c}?", "How many people live in {c}?", "Population of {c}?"], c=city)
    return Script(q, ["get_city_population"], [_call("get_city_population", city=city)],
                  lambda r: str(r[0]).replace(" inhabitants", " inhabitants.") if str(r[0]).endswith("inhabitants")
                  else str(r[0]))


def _rid(rng: random.Random, prefix: str) -> str:
    return f"{prefix}{rng.randint(100, 99999)}"


def q_records(rng: random.Random) -> Script:
    kind = rng.choice(["user", "invoice", "ticket"])
    if kind == "user":
        uid = _rid(rng, rng.choice(["u", "U-", "user_"]))
        field_ = rng.choice(["email", "plan", "name", "joined"])
        words = {"email": "email address", "plan": "plan", "name": "name", "joined": "sign-up date"}[field_]
        q = _pick(rng, ["What is the {f} of user {i}?", "Which {f} does user {i} have?", "Find the {f} for user {i}.",
                        "user {i}: what's their {f}?"], f=words, i=uid)
        return Script(q, ["get_user_profile"], [_call("get_user_profile", user_id=uid)], lambda r: _pick(rng, [
            "User {i}'s {f} is {x}.", "The {f} of user {i} is {x}."], i=uid, f=words, x=r[0][field_]))
    if kind == "invoice":
        iid = _rid(rng, rng.choice(["INV-", "inv", "A-"]))
        field_ = rng.choice(["status", "amount", "due_date"])
        words = {"status": "status", "amount": "amount", "due_date": "due date"}[field_]
        q = _pick(rng, ["What is the {f} of invoice {i}?", "Check the {f} of invoice {i}.", "Invoice {i}: {f}?"],
                  f=words, i=iid)

        def ans(r: list[Any]) -> str:
            x = r[0][field_]
            return f"Invoice {iid} is {x}." if field_ == "status" else (
                f"The amount of invoice {iid} is {x} USD." if field_ == "amount" else f"Invoice {iid} is due on {x}.")
        return Script(q, ["get_invoice"], [_call("get_invoice", invoice_id=iid)], ans)
    tid = _rid(rng, rng.choice(["T-", "#", "TCK"]))
    field_ = rng.choice(["status", "priority", "assignee", "subject"])
    words = {"status": "status", "priority": "priority", "assignee": "assignee", "subject": "subject"}[field_]
    q = _pick(rng, ["What is the {f} of ticket {i}?", "Who is ticket {i} assigned to?" if field_ == "assignee" else
                    "Tell me the {f} of support ticket {i}.", "ticket {i} {f}?"], f=words, i=tid)
    return Script(q, ["get_ticket"], [_call("get_ticket", ticket_id=tid)], lambda r: _pick(rng, [
        "The {f} of ticket {i} is {x}.", "Ticket {i}: {f} {x}."], f=words, i=tid, x=r[0][field_]))


def _rdate(rng: random.Random) -> str:
    return (_dt.date(2015, 1, 1) + _dt.timedelta(days=rng.randint(0, 5000))).isoformat()


def q_dates(rng: random.Random) -> Script:
    kind = rng.choice(["weekday", "add", "between"])
    d = _rdate(rng)
    if kind == "weekday":
        q = _pick(rng, ["What day of the week was {d}?", "Which weekday is {d}?", "What weekday falls on {d}?"], d=d)
        return Script(q, ["day_of_week"], [_call("day_of_week", date=d)], lambda r: _pick(rng, [
            "{d} is a {x}.", "{d} falls on a {x}."], d=d, x=r[0]))
    if kind == "add":
        n = rng.randint(1, 400)
        q = _pick(rng, ["What date is {n} days after {d}?", "Add {n} days to {d}.", "Which date is {n} days from {d}?"],
                  n=n, d=d)
        return Script(q, ["add_days"], [_call("add_days", date=d, days=n)], lambda r: _pick(rng, [
            "{n} days after {d} is {x}.", "It is {x}."], n=n, d=d, x=r[0]))
    e = _rdate(rng)
    a, b = sorted([d, e])
    q = _pick(rng, ["How many days are there between {a} and {b}?", "Count the days from {a} to {b}.",
                    "How many days from {a} until {b}?"], a=a, b=b)
    return Script(q, ["days_between"], [_call("days_between", start=a, end=b)], lambda r: _pick(rng, [
        "There are {x} days between {a} and {b}.", "From {a} to {b} is {x} days."], a=a, b=b, x=r[0]))


_PHRASES = ["good morning", "the quick brown fox", "hello world", "data never sleeps", "open the pod bay doors",
            "banana bread", "a stitch in time", "keep calm and carry on", "river stones", "mississippi",
            "pack my box with five dozen jugs", "the rain in spain", "coffee before code", "green tea latte"]


def q_strings(rng: random.Random) -> Script:
    kind = rng.choice(["upper", "count", "reverse", "words"])
    text = rng.choice(_PHRASES) if rng.random() < 0.6 else " ".join(_word(rng).lower() for _ in range(rng.randint(1, 4)))
    if kind == "upper":
        q = _pick(rng, ["Convert '{t}' to upper case.", "Write '{t}' in capital letters.", "Uppercase this: {t}"], t=text)
        return Script(q, ["to_uppercase"], [_call("to_uppercase", text=text)], lambda r: _pick(rng, [
            "In upper case: {x}", "{x}"], x=r[0]))
    if kind == "count":
        letter = rng.choice([c for c in text if c.isalpha()])
        q = _pick(rng, ["How many times does the letter '{l}' appear in '{t}'?", "Count the letter {l} in '{t}'."],
                  l=letter, t=text)
        return Script(q, ["count_letters"], [_call("count_letters", text=text, letter=letter)], lambda r: _pick(rng, [
            "The letter '{l}' appears {x} times in '{t}'.", "'{l}' occurs {x} times."], l=letter, t=text, x=r[0]))
    if kind == "reverse":
        q = _pick(rng, ["Reverse the text '{t}'.", "What is '{t}' backwards?", "Spell '{t}' in reverse."], t=text)
        return Script(q, ["reverse_text"], [_call("reverse_text", text=text)], lambda r: _pick(rng, [
            "'{t}' reversed is '{x}'.", "Backwards: {x}"], t=text, x=r[0]))
    q = _pick(rng, ["How many words are in '{t}'?", "Count the words in: {t}"], t=text)
    return Script(q, ["word_count"], [_call("word_count", text=text)], lambda r: _pick(rng, [
        "'{t}' has {x} words.", "There are {x} words."], t=text, x=r[0]))


_TOPIC_Q = {"parking": ["Where can staff park?", "What does the handbook say about parking?"],
            "holidays": ["How many days of paid holiday do employees get?", "What is the holiday policy?"],
            "expenses": ["How are meals reimbursed?", "What is the deadline for expense claims?"],
            "laptops": ["How often are laptops replaced?", "How do I request a new laptop?"],
            "remote work": ["How many days a week can I work remotely?", "What is the remote work policy?"],
            "security": ["What do I do if I lose my badge?", "What is the rule about badges?"],
            "training": ["What is the training budget per year?", "How much can I spend on training?"],
            "canteen": ["When is the canteen open?", "What are the canteen hours?"],
            "gym": ["When is the gym open?", "Is the gym free for staff?"],
            "mail": ["When does outgoing mail leave?", "What do parcels need?"],
            "bikes": ["Where are the bike racks?", "Where can I take a shower after cycling?"],
            "printing": ["How much does colour printing cost?", "Who pays for colour printing?"]}


def q_search(rng: random.Random) -> Script:
    topic = rng.choice(sorted(_TOPIC_Q))
    q = rng.choice(_TOPIC_Q[topic])
    query = topic if rng.random() < 0.6 else q.rstrip("?")
    return Script(q, ["search_docs"], [_call("search_docs", query=query)],
                  lambda r: "According to the handbook: " + _HANDBOOK[topic])


MAKERS: dict[str, Callable[[random.Random], Script]] = {
    "arithmetic": q_arithmetic, "units": q_units, "tables": q_tables, "records": q_records, "dates": q_dates,
    "strings": q_strings, "search": q_search}


# ----------------------------------------------------------------------------- two-step scripts

def q_expression(rng: random.Random) -> Script:
    """``(a op1 b) op2 c``: two arithmetic calls, the second on the first result (the tools a user binds
    for arithmetic: one per operation, under one of its usual names)."""
    op1, op2 = rng.choice(sorted(_OPS)), rng.choice(sorted(_OPS))
    a, b, c = rng.randint(1, 40), rng.randint(1, 40), rng.randint(2, 12)
    sym = {"add": "+", "multiply": "*", "subtract": "-"}
    t1, (x1, y1) = rng.choice(ARITH_NAMES[op1])
    t2, (x2, y2) = rng.choice([n for n in ARITH_NAMES[op2] if n[0] != t1] or ARITH_NAMES[op2])
    expr = f"({a} {sym[op1]} {b}) {sym[op2]} {c}"
    q = _pick(rng, ["What is {e}?", "Compute {e}.", "Calculate {e} using the tools.", "what's {e}"], e=expr)
    first = _OPS[op1](a, b)
    return Script(q, [t1, t2], [lambda r: (t1, {x1: a, y1: b}), lambda r: (t2, {x2: r[0], y2: c})],
                  lambda r: _pick(rng, ["{e} = {x}.", "{a} {s} {b} is {f}, and {f} {s2} {c} is {x}. The answer is {x}."],
                                  e=expr, x=r[1], a=a, b=b, c=c, f=first, s=sym[op1], s2=sym[op2]), kind="chain")


def q_chain(rng: random.Random) -> Script:
    """Two calls, the second uses the first result."""
    kind = rng.choice(["price_times", "weekday_after", "population_pct", "invoice_pct", "convert_then_multiply",
                       "expression", "expression"])
    if kind == "expression":
        return q_expression(rng)
    if kind == "price_times":
        p, n = _product(rng), rng.randint(2, 12)
        q = _pick(rng, ["How much do {n} {p}s cost in total?", "What would {n} of the {p} cost?",
                        "I want to buy {n} {p}s. What is the total price?"], n=n, p=p)

        return Script(q, ["get_product_price", "multiply"],
                      [_call("get_product_price", product=p), lambda r: ("multiply", {"a": _price_value(r[0]), "b": n})],
                      lambda r: f"One {p} costs {_price_value(r[0]):.2f} USD, so {n} cost {r[1]} USD.", kind="chain")
    if kind == "weekday_after":
        d, n = _rdate(rng), rng.randint(1, 300)
        q = _pick(rng, ["What day of the week is {n} days after {d}?", "Which weekday will it be {n} days after {d}?"],
                  n=n, d=d)
        return Script(q, ["add_days", "day_of_week"],
                      [_call("add_days", date=d, days=n), lambda r: ("day_of_week", {"date": r[0]})],
                      lambda r: f"{n} days after {d} is {r[0]}, a {r[1]}.", kind="chain")
    if kind == "population_pct":
        city, pct = _word(rng, 3), rng.choice([10, 20, 25, 50])

        def people(r: list[Any]) -> int:
            return int(str(r[0]).split(" has ")[1].split()[0].replace(",", ""))
        q = _pick(rng, ["What is {p}% of the population of {c}?", "How many people are {p} percent of {c}'s population?"],
                  p=pct, c=city)
        return Script(q, ["get_city_population", "percentage"],
                      [_call("get_city_population", city=city),
                       lambda r: ("percentage", {"percent": pct, "value": people(r)})],
                      lambda r: f"{city} has {people(r):,} inhabitants; {pct}% of that is {r[1]}.", kind="chain")
    if kind == "invoice_pct":
        iid, pct = _rid(rng, "INV-"), rng.choice([5, 10, 15, 20])
        q = _pick(rng, ["What is a {p}% discount on invoice {i}?", "Compute {p}% of the amount of invoice {i}."],
                  p=pct, i=iid)
        return Script(q, ["get_invoice", "percentage"],
                      [_call("get_invoice", invoice_id=iid),
                       lambda r: ("percentage", {"percent": pct, "value": r[0]["amount"]})],
                      lambda r: f"Invoice {iid} is {r[0]['amount']} USD; {pct}% of it is {r[1]} USD.", kind="chain")
    v, n = rng.randint(2, 60), rng.randint(2, 10)
    q = _pick(rng, ["A lap is {v} km. How many miles are {n} laps?", "Convert {v} km to miles and multiply by {n}."],
              v=v, n=n)
    return Script(q, ["convert_length", "multiply"],
                  [_call("convert_length", value=v, from_unit="km", to_unit="miles"),
                   lambda r: ("multiply", {"a": r[0], "b": n})],
                  lambda r: f"{v} km is {r[0]} miles, so {n} laps are {r[1]} miles.", kind="chain")


def q_lookup_chain(rng: random.Random) -> Script:
    """A record holds the value in one form, the question asks for another: look it up, then convert or
    compute with what the record says. The question names the entity, never the intermediate value."""
    kind = rng.choice(["crate_weight", "trail_length", "trail_climb", "invoice_split", "price_tax",
                       "signup_weekday", "due_plus"])
    if kind == "crate_weight":
        cid, unit = _rid(rng, rng.choice(["C-", "CR", "crate "])).replace("crate ", "CR-"), rng.choice(["lb", "g", "oz"])
        word = {"lb": "pounds", "g": "grams", "oz": "ounces"}[unit]
        q = _pick(rng, ["How many {w} does crate {i} weigh?", "What is the weight of crate {i} in {w}?",
                        "Crate {i}: how heavy is it in {w}?"], w=word, i=cid)
        return Script(q, ["get_crate", "convert_weight"],
                      [_call("get_crate", crate_id=cid),
                       lambda r: ("convert_weight", {"value": r[0]["weight_kg"], "from_unit": "kg", "to_unit": unit})],
                      lambda r: f"Crate {cid} weighs {r[0]['weight_kg']} kg, which is {r[1]} {word}.", kind="chain")
    if kind in ("trail_length", "trail_climb"):
        name = f"{_word(rng, 2)} {rng.choice(['Ridge', 'Creek', 'Loop', 'Pass'])}"
        length = kind == "trail_length"
        key, unit, to = ("length_km", "km", rng.choice(["miles", "m"])) if length else ("elevation_gain_m", "m", "ft")
        word = {"miles": "miles", "m": "metres", "ft": "feet"}[to]
        q = _pick(rng, ["How long is the {n} trail in {w}?", "What is the length of the {n} trail, in {w}?"]
                  if length else ["How many {w} does the {n} trail climb?", "What is the elevation gain of the {n} "
                                  "trail in {w}?"], n=name, w=word)
        return Script(q, ["get_trail", "convert_length"],
                      [_call("get_trail", trail=name),
                       lambda r: ("convert_length", {"value": r[0][key], "from_unit": unit, "to_unit": to})],
                      lambda r: f"The {name} trail {'is' if length else 'climbs'} {r[0][key]} {unit}, which is "
                      f"{r[1]} {word}.", kind="chain")
    if kind == "invoice_split":
        iid, n = _rid(rng, "INV-"), rng.randint(2, 8)
        name, (ka, kb) = rng.choice(ARITH_NAMES["divide"])
        q = _pick(rng, ["We split invoice {i} evenly between {n} people. How much does each pay?",
                        "Invoice {i} is shared by {n} teams equally: what is each share?"], i=iid, n=n)
        return Script(q, ["get_invoice", name],
                      [_call("get_invoice", invoice_id=iid), lambda r: (name, {ka: r[0]["amount"], kb: n})],
                      lambda r: f"Invoice {iid} is {r[0]['amount']} USD, so each of the {n} pays {r[1]} USD.",
                      kind="chain")
    if kind == "price_tax":
        p, pct = _product(rng), rng.choice([5, 8, 12, 20])
        q = _pick(rng, ["What is a {t}% tax on the {p}?", "How much is {t} percent of the price of the {p}?"], t=pct, p=p)
        return Script(q, ["get_product_price", "percentage"],
                      [_call("get_product_price", product=p),
                       lambda r: ("percentage", {"percent": pct, "value": _price_value(r[0])})],
                      lambda r: f"The {p} costs {_price_value(r[0]):.2f} USD; {pct}% of that is {r[1]} USD.", kind="chain")
    if kind == "signup_weekday":
        uid = _rid(rng, rng.choice(["u", "U-", "user_"]))
        q = _pick(rng, ["On which day of the week did user {i} sign up?", "What weekday did user {i} join?"], i=uid)
        return Script(q, ["get_user_profile", "day_of_week"],
                      [_call("get_user_profile", user_id=uid), lambda r: ("day_of_week", {"date": r[0]["joined"]})],
                      lambda r: f"User {uid} joined on {r[0]['joined']}, a {r[1]}.", kind="chain")
    iid, n = _rid(rng, "INV-"), rng.choice([7, 14, 30, 60])
    q = _pick(rng, ["What date is {n} days after the due date of invoice {i}?",
                    "Invoice {i} gets {n} extra days past its due date. What is the new date?"], n=n, i=iid)
    return Script(q, ["get_invoice", "add_days"],
                  [_call("get_invoice", invoice_id=iid), lambda r: ("add_days", {"date": r[0]["due_date"], "days": n})],
                  lambda r: f"Invoice {iid} is due on {r[0]['due_date']}; {n} days later is {r[1]}.", kind="chain")


def q_two(rng: random.Random) -> Script:
    """The same tool for two entities, then a comparison or both values."""
    kind = rng.choice(["population", "price", "weekday", "employee"])
    if kind == "population":
        a, b = _word(rng, 3), _word(rng, 3)

        def n(x: Any) -> int:
            return int(str(x).split(" has ")[1].split()[0].replace(",", ""))
        q = _pick(rng, ["Which city has more people, {a} or {b}?", "Compare the populations of {a} and {b}."], a=a, b=b)
        return Script(q, ["get_city_population"], [_call("get_city_population", city=a),
                                                   _call("get_city_population", city=b)],
                      lambda r: f"{a} has {n(r[0]):,} inhabitants and {b} has {n(r[1]):,}, so "
                      f"{a if n(r[0]) > n(r[1]) else b} is bigger.", kind="two")
    if kind == "price":
        a, b = _product(rng), _product(rng)
        q = _pick(rng, ["Which is cheaper, the {a} or the {b}?", "What do the {a} and the {b} cost?"], a=a, b=b)
        return Script(q, ["get_product_price"], [_call("get_product_price", product=a),
                                                 _call("get_product_price", product=b)],
                      lambda r: f"The {a} costs {_price_of(r[0])} and the {b} costs {_price_of(r[1])}.", kind="two")
    if kind == "weekday":
        a, b = _rdate(rng), _rdate(rng)
        q = _pick(rng, ["What weekdays are {a} and {b}?", "On which days of the week do {a} and {b} fall?"], a=a, b=b)
        return Script(q, ["day_of_week"], [_call("day_of_week", date=a), _call("day_of_week", date=b)],
                      lambda r: f"{a} is a {r[0]} and {b} is a {r[1]}.", kind="two")
    a, b = _person(rng), _person(rng)
    q = _pick(rng, ["What are the phone extensions of {a} and {b}?", "Give me the extensions of {a} and {b}."], a=a, b=b)
    return Script(q, ["get_employee"], [_call("get_employee", name=a), _call("get_employee", name=b)],
                  lambda r: f"{a} is at extension {r[0]['extension']} and {b} at {r[1]['extension']}.", kind="two")



def play(script: Script) -> tuple[list[tuple[str, dict]], list[Any]]:
    """Run a script's calls on the real tools: (calls made, their results)."""
    calls: list[tuple[str, dict]] = []
    results: list[Any] = []
    for step in script.calls:
        name, args = step(results)
        calls.append((name, args))
        results.append(TOOLS[name](**args))
    return calls, results


def _then_ask(q: str) -> str:
    return q[:-1] if q.endswith((".", "?")) else q


def q_pair(rng: random.Random) -> Script:
    """Two questions of one family asked at once (often the same tool for two entities): two calls,
    then one answer with both results. Built from the single-call makers, so every family has pairs."""
    maker = MAKERS[rng.choice(sorted(MAKERS))]
    first = maker(rng)
    for _ in range(20):  # prefer the same tool for both (two entities), else any of the family
        second = maker(rng)
        if second.tools == first.tools or rng.random() < 0.15:
            break
    joiner = rng.choice(["{a} {b}", "{a} And {b}", "{a} Also, {b}", "Two questions. {a} {b}", "{a} What about this: {b}"])
    q = joiner.format(a=first.question, b=second.question[:1].lower() + second.question[1:]
                      if joiner.startswith("{a} And") or "Also" in joiner else second.question)
    tools = list(dict.fromkeys(first.tools + second.tools))
    split = len(first.calls)

    def answer(r: list[Any]) -> str:
        return f"{first.answer(r[:split])} {second.answer(r[split:])}"
    calls = list(first.calls) + [lambda r, c=c: c(r[split:]) for c in second.calls]
    return Script(q, tools, calls, answer, kind="two")


def q_then(rng: random.Random) -> Script:
    """A numeric answer, then arithmetic on it (the second call takes the first result)."""
    for _ in range(50):
        maker = MAKERS[rng.choice(["arithmetic", "units", "dates", "strings", "records", "tables"])]
        first = maker(rng)
        _, results = play(first)
        if len(results) == 1 and isinstance(results[0], (int, float)) and not isinstance(results[0], bool):
            break
        if len(results) == 1 and isinstance(results[0], dict) and "amount" in first.question \
                and isinstance(results[0].get("amount"), (int, float)):
            break
    else:  # pragma: no cover - the makers above always yield numbers quickly
        return q_expression(rng)
    value = results[0]["amount"] if isinstance(results[0], dict) else results[0]
    op = rng.choice(["multiply", "add", "subtract"])
    n = rng.randint(2, 12)
    name, (ka, kb) = rng.choice(ARITH_NAMES[op])
    verb = {"multiply": ["multiply that by {n}", "then times {n}", "multiply the result by {n}"],
            "add": ["add {n} to that", "then add {n}", "plus {n} on top"],
            "subtract": ["subtract {n} from that", "then take away {n}", "minus {n}"]}[op]
    q = f"{_then_ask(first.question)}, and {rng.choice(verb).format(n=n)}?" if rng.random() < 0.5 else \
        f"{first.question} Then {rng.choice(verb).format(n=n).replace('then ', '')}."
    done = {"multiply": "times", "add": "plus", "subtract": "minus"}[op]

    def value_of(r: list[Any]) -> Any:
        return r[0]["amount"] if isinstance(r[0], dict) else r[0]
    return Script(q, list(dict.fromkeys(first.tools + [name])),
                  list(first.calls) + [lambda r: (name, {ka: value_of(r), kb: n})],
                  lambda r: f"{first.answer(r[:1])} {value_of(r)} {done} {n} is {r[1]}.", kind="chain")


# ----------------------------------------------------------------------------- no call

#: questions that need no tool, with a right, short answer (general knowledge and chit-chat)
NO_TOOL = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello, who are you?", "I am a helpful assistant. How can I help?"),
    ("Thanks, that's all.", "You're welcome! Have a nice day."),
    ("Thank you!", "You're welcome!"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("How many days are in a week?", "A week has 7 days."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What colour is grass?", "Grass is green."),
    ("What do bees make?", "Bees make honey."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("Say hello in Spanish.", "Hola!"),
    ("Give me a synonym for happy.", "Joyful."),
    ("Write one sentence about the sea.", "The sea stretches blue and restless to the horizon."),
    ("Tell me a short joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What is water made of?", "Water is made of hydrogen and oxygen (H2O)."),
    ("How many months are in a year?", "A year has 12 months."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("Can you help me?", "Of course! What do you need?"),
    ("Good night!", "Good night! Sleep well."),
    ("What is the first letter of the alphabet?", "The first letter of the alphabet is A."),
    ("Name a primary colour.", "Red is a primary colour."),
]

#: questions about things no training tool covers (the model must say it has no tool for them)
UNCOVERED = [
    ("What's the weather in {c} tomorrow?", "the weather"),
    ("Book me a table for two at {c} Grill.", "restaurant bookings"),
    ("What is the exchange rate from dollars to yen?", "exchange rates"),
    ("Send an email to {p}.", "sending emails"),
    ("What is the stock price of {w} Corp?", "stock prices"),
    ("Play some music.", "playing music"),
    ("Translate 'good morning' into German.", "translation"),
    ("When does the next train to {c} leave?", "train times"),
    ("Set an alarm for 7 am.", "alarms"),
    ("What is the status of flight {w}{n}?", "flight status"),
    ("Order a pizza for me.", "ordering food"),
    ("What's the score of the {c} football match?", "sports scores"),
    ("Turn off the living room lights.", "controlling lights"),
    ("How long is the drive to {c}?", "travel times"),
    ("What time is sunset in {c} today?", "sunset times"),
    ("Find me a hotel in {c} for Friday.", "hotel bookings"),
    ("How humid is it in {c} right now?", "the weather"),
    ("Remind me to call {p} at 5 pm.", "reminders"),
    ("Schedule a meeting with {p} next Monday.", "calendars"),
    ("Where is my parcel {w}{n}?", "parcel tracking"),
    ("What are today's top news headlines?", "news"),
    ("Who is the mayor of {c}?", "facts about cities' officials"),
    ("Call a taxi to {c} station.", "booking taxis"),
    ("How many followers does {p} have online?", "social media"),
    ("What is {p}'s home address?", "home addresses"),
    ("Is the {w} store in {c} open on Sundays?", "opening hours"),
    ("Rate my essay out of ten.", "grading essays"),
    ("What is the air quality index in {c}?", "air quality"),
]


def no_fit_answer(rng: random.Random, topic: str, tool_names: list[str]) -> str:
    tools = ", ".join(tool_names)
    return _pick(rng, ["I can't help with {t}: my tools ({x}) do not cover it.",
                       "Sorry, I have no tool for {t}. I can only use {x}.",
                       "None of my tools can do that; they cover {x}, not {t}."], t=topic, x=tools)
