"""The held-out agent question set of ``flashback-agents eval agents``: hand-written questions over tool
families that the training-data generator never produces, by category.

Nothing here is trained on. The tool families (currency exchange at fixed rates, temperature scales,
stock quotes, flight status, a library catalogue, recipe calories, UTC offsets, BMI, bill splitting, an
English-Spanish dictionary, postal codes, movie showtimes, compound interest, number bases, shipping
cost, meeting rooms, match results) are disjoint from the generator's (arithmetic, length / weight /
volume units, price / employee / population tables, profile / invoice / ticket records, dates, string
tools, document search, weather). Every tool is a plain function with type hints and a one-line
docstring (``langchain_core.tools.tool`` and LlamaIndex ``FunctionTool.from_defaults`` both wrap it),
deterministic over small fixed tables of invented values (this module has no ``from __future__ import
annotations``: LlamaIndex puts the signature in the tool description, and it reads as users' would,
``amount: float`` rather than ``amount: 'float'``). An unknown key returns an error string (what
a real tool would say) instead of raising, so a wrong argument costs the agent a step, not the run.

Categories (:data:`CATEGORIES`):

- ``single``: one tool bound, and it fits;
- ``choice``: 3-4 tools bound, one fits, the others are distractors;
- ``no_tool_needed``: tools bound, but the question needs none (greetings, one-sentence requests,
  general knowledge; the answer is checked loosely);
- ``no_fit``: tools bound, none of them fits; the right behaviour is no call and a text answer;
- ``chain``: two calls, the second uses the first one's result;
- ``two_entities``: the same tool called for two entities; the answer must name both values.

A question's ``answer`` is a tuple of requirements that must all appear in the final answer; each is a
string (case-insensitive, whole words where it starts / ends with a letter or digit), a number (every
number in the answer is read, ``1,234.50`` as 1234.5, and compared with a 0.005 tolerance) or a tuple
of alternatives (any one of them). An empty ``answer``: any non-empty answer is right.
"""

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Union

__all__ = ["CATEGORIES", "QUESTIONS", "TOOLS", "ExpectedCall", "Question", "questions_by_id", "tool_functions"]

CATEGORIES = ("single", "choice", "no_tool_needed", "no_fit", "chain", "two_entities")

Accept = Union[str, float, int, tuple]


# ---------------------------------------------------------------------------- tables (invented values)
#: value of one unit of each currency in USD
_USD_PER_UNIT = {"USD": 1.0, "EUR": 1.25, "GBP": 1.5, "JPY": 0.008, "CHF": 1.2, "CAD": 0.8, "AUD": 0.75,
                 "MXN": 0.05}

_STOCKS = {
    "NOVA": {"ticker": "NOVA", "price": 182.4, "currency": "USD", "change_percent": 1.3},
    "QRTZ": {"ticker": "QRTZ", "price": 47.15, "currency": "USD", "change_percent": 0.4},
    "ZEPH": {"ticker": "ZEPH", "price": 96.0, "currency": "USD", "change_percent": 2.1},
    "BLMP": {"ticker": "BLMP", "price": 12.8, "currency": "USD", "change_percent": 0.9},
    "HXLN": {"ticker": "HXLN", "price": 310.5, "currency": "USD", "change_percent": 0.2},
}

_FLIGHTS = {
    "QX418": {"flight": "QX418", "status": "delayed", "gate": "B12", "departure": "14:35",
              "destination": "Lisbon", "fare_usd": 420.0},
    "LM207": {"flight": "LM207", "status": "on time", "gate": "C4", "departure": "09:10",
              "destination": "Helsinki", "fare_usd": 310.0},
    "TR9031": {"flight": "TR9031", "status": "boarding", "gate": "A7", "departure": "11:50",
               "destination": "Denver", "fare_usd": 250.0},
    "AV66": {"flight": "AV66", "status": "cancelled", "gate": "D19", "departure": "18:05",
             "destination": "Mumbai", "fare_usd": 880.0},
    "KZ550": {"flight": "KZ550", "status": "landed", "gate": "E2", "departure": "06:40",
              "destination": "Santiago", "fare_usd": 640.0},
}

_BOOKS = {
    "the salt orchard": {"title": "The Salt Orchard", "author": "Mirela Vance", "year": 1987},
    "glass rivers": {"title": "Glass Rivers", "author": "Tomas Ekwueme", "year": 2004},
    "a map of quiet hours": {"title": "A Map of Quiet Hours", "author": "Ines Albright", "year": 1962},
    "lanterns over kell": {"title": "Lanterns over Kell", "author": "Oskar Brandt", "year": 1999},
    "the copper finch": {"title": "The Copper Finch", "author": "Hana Sato", "year": 2016},
}

_RECIPES = {
    "lentil soup": {"recipe": "lentil soup", "calories_per_serving": 310, "servings": 4},
    "mushroom risotto": {"recipe": "mushroom risotto", "calories_per_serving": 540, "servings": 3},
    "chickpea curry": {"recipe": "chickpea curry", "calories_per_serving": 420, "servings": 4},
    "banana bread": {"recipe": "banana bread", "calories_per_serving": 260, "servings": 10},
    "green salad": {"recipe": "green salad", "calories_per_serving": 150, "servings": 2},
}

_UTC_OFFSETS = {"tokyo": "+09:00", "lima": "-05:00", "nairobi": "+03:00", "sydney": "+10:00", "lisbon": "+00:00",
                "santiago": "-04:00", "mumbai": "+05:30", "denver": "-07:00", "helsinki": "+02:00",
                "reykjavik": "+00:00"}

_SPANISH = {"apple": "manzana", "library": "biblioteca", "window": "ventana", "butterfly": "mariposa",
            "cheese": "queso", "key": "llave", "cloud": "nube", "bridge": "puente"}

_POSTAL = {
    "40213": {"postal_code": "40213", "town": "Harwick", "region": "North Vale", "shipping_zone": "A"},
    "77805": {"postal_code": "77805", "town": "Calder Springs", "region": "Eastmarch", "shipping_zone": "B"},
    "10442": {"postal_code": "10442", "town": "Oakhollow", "region": "Riverlands", "shipping_zone": "A"},
    "58120": {"postal_code": "58120", "town": "Port Meridian", "region": "South Reach", "shipping_zone": "C"},
}

_SHOWTIMES = {
    "the paper comet": {"movie": "The Paper Comet", "cinema": "Rialto 3", "times": ["17:15", "20:40"]},
    "midnight in kestrel": {"movie": "Midnight in Kestrel", "cinema": "Odeon Park", "times": ["19:00", "22:30"]},
    "the last lighthouse": {"movie": "The Last Lighthouse", "cinema": "Rialto 1", "times": ["13:45", "16:20"]},
}

#: shipping: (base fee, fee per kg) in USD by zone
_SHIPPING = {"A": (5.0, 2.0), "B": (8.0, 3.0), "C": (12.0, 4.5)}

_ROOMS = {
    "juniper": {"room": "Juniper", "capacity": 8, "free": ["09:00-10:00", "15:30-17:00"]},
    "cedar": {"room": "Cedar", "capacity": 4, "free": ["11:00-12:30"]},
    "willow": {"room": "Willow", "capacity": 12, "free": ["08:30-09:30", "13:00-14:00"]},
    "aspen": {"room": "Aspen", "capacity": 20, "free": []},
}

_MATCHES = {
    "harbor city": {"team": "Harbor City", "opponent": "Kestrel United", "score": "2-1", "result": "won"},
    "kestrel united": {"team": "Kestrel United", "opponent": "Harbor City", "score": "1-2", "result": "lost"},
    "northgate rovers": {"team": "Northgate Rovers", "opponent": "Pinewood Athletic", "score": "3-3",
                         "result": "drew"},
    "pinewood athletic": {"team": "Pinewood Athletic", "opponent": "Northgate Rovers", "score": "3-3",
                          "result": "drew"},
}


def _key(text: Any) -> str:
    return " ".join(str(text).split()).lower()


def _code(text: Any) -> str:
    return "".join(str(text).split()).upper()


def _unknown(what: str, value: Any, known: Any) -> str:
    return f"Error: unknown {what} {value!r}. Known: {', '.join(sorted(known))}."


# ---------------------------------------------------------------------------- tools
def convert_currency(amount: float, from_currency: str, to_currency: str) -> float:
    """Convert an amount of money between currencies (ISO codes such as USD, EUR, GBP, JPY) at today's fixed rates."""
    src, dst = _code(from_currency), _code(to_currency)
    for c in (src, dst):
        if c not in _USD_PER_UNIT:
            return _unknown("currency", c, _USD_PER_UNIT)  # type: ignore[return-value]
    return round(float(amount) * _USD_PER_UNIT[src] / _USD_PER_UNIT[dst], 2)


def celsius_to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""
    return round(float(celsius) * 9 / 5 + 32, 2)


def fahrenheit_to_celsius(fahrenheit: float) -> float:
    """Convert a temperature from degrees Fahrenheit to degrees Celsius."""
    return round((float(fahrenheit) - 32) * 5 / 9, 2)


def get_stock_quote(ticker: str) -> dict:
    """Get the latest share price of a stock by its ticker symbol."""
    row = _STOCKS.get(_code(ticker))
    return dict(row) if row else {"error": _unknown("ticker", ticker, _STOCKS)}


def get_flight_status(flight_number: str) -> dict:
    """Get the status, gate, departure time, destination and fare (USD) of a flight by its flight number."""
    row = _FLIGHTS.get(_code(flight_number))
    return dict(row) if row else {"error": _unknown("flight", flight_number, _FLIGHTS)}


def find_book(title: str) -> dict:
    """Look up a book in the library catalogue by title: its author and publication year."""
    row = _BOOKS.get(_key(title).strip("'\""))
    return dict(row) if row else {"error": _unknown("title", title, (b["title"] for b in _BOOKS.values()))}


def recipe_calories(recipe: str) -> dict:
    """Get the calories per serving and the number of servings of a recipe."""
    row = _RECIPES.get(_key(recipe))
    return dict(row) if row else {"error": _unknown("recipe", recipe, _RECIPES)}


def get_utc_offset(city: str) -> str:
    """Get the UTC offset (standard time) of a city, such as +09:00."""
    return _UTC_OFFSETS.get(_key(city)) or _unknown("city", city, (c.title() for c in _UTC_OFFSETS))


def compute_bmi(weight_kg: float, height_m: float) -> float:
    """Compute the body mass index from a weight in kilograms and a height in metres."""
    if float(height_m) <= 0:
        return "Error: height_m must be positive."  # type: ignore[return-value]
    return round(float(weight_kg) / float(height_m) ** 2, 1)


def split_bill(total: float, people: int, tip_percent: float) -> dict:
    """Split a restaurant bill between people after adding a tip: the total with tip and the amount per person."""
    if int(people) < 1:
        return {"error": "people must be at least 1"}
    with_tip = round(float(total) * (1 + float(tip_percent) / 100), 2)
    return {"total_with_tip": with_tip, "per_person": round(with_tip / int(people), 2)}


def translate_to_spanish(word: str) -> str:
    """Translate one English word into Spanish with a small dictionary."""
    return _SPANISH.get(_key(word).strip("'\"")) or _unknown("word", word, _SPANISH)


def lookup_postal_code(postal_code: str) -> dict:
    """Find the town, region and shipping zone of a postal code."""
    row = _POSTAL.get(_code(postal_code))
    return dict(row) if row else {"error": _unknown("postal code", postal_code, _POSTAL)}


def movie_showtimes(movie: str) -> dict:
    """Get today's cinema and showtimes of a movie."""
    row = _SHOWTIMES.get(_key(movie).strip("'\""))
    return ({**row, "times": list(row["times"])} if row
            else {"error": _unknown("movie", movie, (m["movie"] for m in _SHOWTIMES.values()))})


def compound_interest(principal: float, annual_rate_percent: float, years: int) -> float:
    """Compute the final balance of a deposit with interest compounded once a year."""
    return round(float(principal) * (1 + float(annual_rate_percent) / 100) ** int(years), 2)


def convert_number_base(number: int, base: int) -> str:
    """Write a whole number in another base (2 to 16), e.g. base 2 for binary or 16 for hexadecimal."""
    n, b = int(number), int(base)
    if not 2 <= b <= 16:
        return "Error: base must be between 2 and 16."
    digits, sign, n = "", "-" if n < 0 else "", abs(n)
    while True:
        n, r = divmod(n, b)
        digits = "0123456789abcdef"[r] + digits
        if n == 0:
            return sign + digits


def shipping_cost(weight_kg: float, zone: str) -> float:
    """Compute the cost in USD of shipping a parcel of a given weight to a shipping zone (A, B or C)."""
    fees = _SHIPPING.get(_code(zone))
    if fees is None:
        return _unknown("zone", zone, _SHIPPING)  # type: ignore[return-value]
    return round(fees[0] + fees[1] * float(weight_kg), 2)


def room_availability(room: str) -> dict:
    """Get the capacity of a meeting room and the time slots when it is free today."""
    row = _ROOMS.get(_key(room).removesuffix(" room"))
    return ({**row, "free": list(row["free"])} if row
            else {"error": _unknown("room", room, (r["room"] for r in _ROOMS.values()))})


def match_result(team: str) -> dict:
    """Get the result of a sports team's most recent match: the opponent and the score."""
    name = _key(team)
    row = _MATCHES.get(name) or _MATCHES.get(name.removesuffix(" fc"))
    return dict(row) if row else {"error": _unknown("team", team, (m["team"] for m in _MATCHES.values()))}


TOOLS: dict[str, Callable[..., Any]] = {fn.__name__: fn for fn in (
    convert_currency, celsius_to_fahrenheit, fahrenheit_to_celsius, get_stock_quote, get_flight_status, find_book,
    recipe_calories, get_utc_offset, compute_bmi, split_bill, translate_to_spanish, lookup_postal_code,
    movie_showtimes, compound_interest, convert_number_base, shipping_cost, room_availability, match_result)}


def tool_functions(names: tuple[str, ...] | list[str]) -> list[Callable[..., Any]]:
    """The tool functions of these names, in order."""
    return [TOOLS[n] for n in names]


def tool_signature(name: str) -> inspect.Signature:
    return inspect.signature(TOOLS[name])


# ---------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class ExpectedCall:
    name: str
    args: dict = field(default_factory=dict)

    def run(self) -> Any:
        return TOOLS[self.name](**self.args)


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    tools: tuple[str, ...]
    text: str
    calls: tuple[ExpectedCall, ...] = ()
    answer: tuple[Accept, ...] = ()

    @property
    def first_call(self) -> ExpectedCall | None:
        return self.calls[0] if self.calls else None

    @property
    def expects_call(self) -> bool:
        return bool(self.calls)


def _c(name: str, **args: Any) -> ExpectedCall:
    return ExpectedCall(name, args)


def _q(qid: str, category: str, tools: str, text: str, calls: tuple = (), answer: tuple = ()) -> Question:
    return Question(qid, category, tuple(tools.split()), text, tuple(calls), tuple(answer))


_PLUS9 = ("+09:00", "+9", "+09")
_MINUS5 = ("-05:00", "-5", "-05", "−5")

QUESTIONS: tuple[Question, ...] = (
    # ------------------------------------------------------------------ single: one tool, it fits
    _q("single-currency", "single", "convert_currency", "How much is 200 EUR in USD?",
       [_c("convert_currency", amount=200, from_currency="EUR", to_currency="USD")], [250]),
    _q("single-stock", "single", "get_stock_quote", "What's the current share price of NOVA?",
       [_c("get_stock_quote", ticker="NOVA")], [182.4]),
    _q("single-flight", "single", "get_flight_status", "is flight QX418 on time today",
       [_c("get_flight_status", flight_number="QX418")], ["delayed"]),
    _q("single-book", "single", "find_book", "Who wrote The Copper Finch?",
       [_c("find_book", title="The Copper Finch")], ["Hana Sato"]),
    _q("single-recipe", "single", "recipe_calories",
       "How many calories are in one serving of mushroom risotto?",
       [_c("recipe_calories", recipe="mushroom risotto")], [540]),
    _q("single-utc", "single", "get_utc_offset", "what is the utc offset of Nairobi",
       [_c("get_utc_offset", city="Nairobi")], [("+03:00", "+3", "+03")]),
    _q("single-bmi", "single", "compute_bmi",
       "Compute the BMI of someone who weighs 70 kg and is 1.75 m tall.",
       [_c("compute_bmi", weight_kg=70, height_m=1.75)], [22.9]),
    _q("single-split", "single", "split_bill",
       "Split a bill of 120 between 4 people with a 15% tip. How much does each person pay?",
       [_c("split_bill", total=120, people=4, tip_percent=15)], [34.5]),
    _q("single-spanish", "single", "translate_to_spanish", "Give me the Spanish word for butterfly.",
       [_c("translate_to_spanish", word="butterfly")], ["mariposa"]),
    _q("single-postal", "single", "lookup_postal_code", "Which town has the postal code 77805?",
       [_c("lookup_postal_code", postal_code="77805")], ["Calder Springs"]),
    _q("single-movie", "single", "movie_showtimes", "When is The Paper Comet showing today?",
       [_c("movie_showtimes", movie="The Paper Comet")], ["17:15", "20:40"]),
    _q("single-base", "single", "convert_number_base", "Convert 255 to base 16.",
       [_c("convert_number_base", number=255, base=16)], [("ff", "0xff")]),
    _q("single-match", "single", "match_result",
       "Tell me how Northgate Rovers did in their last match.",
       [_c("match_result", team="Northgate Rovers")], [("3-3", "3 - 3", "3–3", "three all")]),

    # ------------------------------------------------------------------ choice: one of 3-4 tools fits
    _q("choice-c2f", "choice", "fahrenheit_to_celsius celsius_to_fahrenheit compute_bmi",
       "It's 25 degrees Celsius outside. What is that in Fahrenheit?",
       [_c("celsius_to_fahrenheit", celsius=25)], [77]),
    _q("choice-f2c", "choice", "celsius_to_fahrenheit fahrenheit_to_celsius convert_currency",
       "Please convert 212 °F to Celsius.",
       [_c("fahrenheit_to_celsius", fahrenheit=212)], [100]),
    _q("choice-shipping", "choice", "convert_currency shipping_cost lookup_postal_code",
       "How much does it cost to ship a 3 kg parcel to zone B?",
       [_c("shipping_cost", weight_kg=3, zone="B")], [17]),
    _q("choice-interest", "choice", "split_bill compound_interest convert_currency",
       "If I put 1000 dollars in a savings account at 4 percent a year for 3 years, what will the balance be?",
       [_c("compound_interest", principal=1000, annual_rate_percent=4, years=3)], [1124.86]),
    _q("choice-room", "choice", "movie_showtimes get_utc_offset room_availability",
       "When is the Cedar meeting room free today?",
       [_c("room_availability", room="Cedar")], ["11:00"]),
    _q("choice-match", "choice", "get_stock_quote match_result find_book",
       "What was the score in Kestrel United's last game?",
       [_c("match_result", team="Kestrel United")], [("1-2", "2-1", "1 - 2", "2 - 1", "1–2", "2–1")]),
    _q("choice-stock", "choice", "convert_currency compound_interest get_stock_quote",
       "Look up the share price for ticker HXLN.",
       [_c("get_stock_quote", ticker="HXLN")], [310.5]),
    _q("choice-book", "choice", "movie_showtimes find_book translate_to_spanish",
       "In what year was Glass Rivers published?",
       [_c("find_book", title="Glass Rivers")], [2004]),
    _q("choice-spanish", "choice", "find_book get_utc_offset translate_to_spanish",
       "how do you say window in spanish",
       [_c("translate_to_spanish", word="window")], ["ventana"]),
    _q("choice-utc", "choice", "get_flight_status get_utc_offset room_availability",
       "I need the UTC offset for Sydney, please.",
       [_c("get_utc_offset", city="Sydney")], [("+10:00", "+10")]),
    _q("choice-gate", "choice", "shipping_cost get_utc_offset get_flight_status",
       "Which gate does flight LM207 leave from?",
       [_c("get_flight_status", flight_number="LM207")], ["C4"]),
    _q("choice-recipe", "choice", "compute_bmi recipe_calories split_bill",
       "calories per serving of chickpea curry?",
       [_c("recipe_calories", recipe="chickpea curry")], [420]),
    _q("choice-currency", "choice", "get_stock_quote shipping_cost convert_currency",
       "How many JPY do I get for 500 GBP?",
       [_c("convert_currency", amount=500, from_currency="GBP", to_currency="JPY")], [93750]),
    _q("choice-postal", "choice", "shipping_cost lookup_postal_code get_utc_offset movie_showtimes",
       "Which region is the postal code 10442 in?",
       [_c("lookup_postal_code", postal_code="10442")], ["Riverlands"]),
    _q("choice-binary", "choice", "convert_number_base compute_bmi celsius_to_fahrenheit",
       "Write the number 42 in base 2.",
       [_c("convert_number_base", number=42, base=2)], ["101010"]),

    # ------------------------------------------------------------------ no_tool_needed: tools bound, none needed
    _q("none-greeting", "no_tool_needed", "get_stock_quote convert_currency", "Hi there! How are you today?"),
    _q("none-thanks", "no_tool_needed", "room_availability",
       "Say thank you to the team for the launch, in one sentence.", answer=[("thank", "grateful", "gratitude")]),
    _q("none-sky", "no_tool_needed", "celsius_to_fahrenheit get_utc_offset",
       "What colour is the sky on a clear day?", answer=["blue"]),
    _q("none-week", "no_tool_needed", "compound_interest", "How many days are there in a week?",
       answer=[(7, "seven")]),
    _q("none-capital", "no_tool_needed", "lookup_postal_code get_utc_offset", "What is the capital of France?",
       answer=["Paris"]),
    _q("none-cats", "no_tool_needed", "movie_showtimes find_book", "Write one short sentence about cats.",
       answer=[("cat", "cats", "kitten")]),
    _q("none-bees", "no_tool_needed", "recipe_calories", "what do bees make",
       answer=["honey"]),
    _q("none-cow", "no_tool_needed", "translate_to_spanish match_result", "Which farm animal says moo?",
       answer=[("cow", "cows", "cattle")]),
    _q("none-opposite", "no_tool_needed", "celsius_to_fahrenheit fahrenheit_to_celsius",
       "What is the opposite of hot?", answer=["cold"]),
    _q("none-spain", "no_tool_needed", "translate_to_spanish get_flight_status",
       "Which language do people mainly speak in Spain?", answer=[("Spanish", "Castilian", "español")]),

    # ------------------------------------------------------------------ no_fit: tools bound, none fits
    _q("nofit-stock", "no_fit", "convert_currency compute_bmi", "What is the share price of Apple right now?"),
    _q("nofit-utc", "no_fit", "translate_to_spanish find_book", "What is the UTC offset of Cairo?"),
    _q("nofit-book", "no_fit", "get_stock_quote shipping_cost", "Who wrote the novel Pride and Prejudice?"),
    _q("nofit-flight", "no_fit", "recipe_calories room_availability", "Has flight BA117 landed yet?"),
    _q("nofit-french", "no_fit", "translate_to_spanish", "Translate the word cheese into French."),
    _q("nofit-email", "no_fit", "split_bill movie_showtimes", "Send an email to my manager saying I'll be late."),
    _q("nofit-movie", "no_fit", "compound_interest convert_number_base",
       "what time is the new Batman movie playing tonight"),
    _q("nofit-score", "no_fit", "get_utc_offset lookup_postal_code", "What was the score of last night's match?"),
    _q("nofit-alarm", "no_fit", "match_result movie_showtimes", "Set an alarm for 7 am tomorrow."),
    _q("nofit-kelvin", "no_fit", "get_flight_status room_availability", "Convert 30 degrees Celsius to Kelvin."),

    # ------------------------------------------------------------------ chain: the second call uses the first result
    _q("chain-flight-eur", "chain", "get_flight_status convert_currency",
       "What does a ticket on flight QX418 cost in EUR?",
       [_c("get_flight_status", flight_number="QX418"),
        _c("convert_currency", amount=420, from_currency="USD", to_currency="EUR")], [336]),
    _q("chain-flight-utc", "chain", "get_flight_status get_utc_offset",
       "What is the UTC offset at the destination of flight KZ550?",
       [_c("get_flight_status", flight_number="KZ550"), _c("get_utc_offset", city="Santiago")],
       [("-04:00", "-4", "-04", "−4")]),
    _q("chain-stock-gbp", "chain", "get_stock_quote convert_currency",
       "How much is one ZEPH share worth in GBP?",
       [_c("get_stock_quote", ticker="ZEPH"),
        _c("convert_currency", amount=96, from_currency="USD", to_currency="GBP")], [64]),
    _q("chain-postal-shipping", "chain", "lookup_postal_code shipping_cost",
       "Find the shipping zone of postal code 58120, then tell me what it costs to ship 2 kg there.",
       [_c("lookup_postal_code", postal_code="58120"), _c("shipping_cost", weight_kg=2, zone="C")], [21]),
    _q("chain-book-binary", "chain", "find_book convert_number_base",
       "Find the year The Salt Orchard was published and write that year in binary.",
       [_c("find_book", title="The Salt Orchard"), _c("convert_number_base", number=1987, base=2)],
       ["11111000011"]),
    _q("chain-currency-split", "chain", "convert_currency split_bill",
       "We owe 80 GBP. Convert it to USD, then split the USD amount between 4 people with a 10% tip.",
       [_c("convert_currency", amount=80, from_currency="GBP", to_currency="USD"),
        _c("split_bill", total=120, people=4, tip_percent=10)], [33]),
    _q("chain-shipping-jpy", "chain", "shipping_cost convert_currency",
       "Shipping 5 kg to zone A: what does that cost in JPY?",
       [_c("shipping_cost", weight_kg=5, zone="A"),
        _c("convert_currency", amount=15, from_currency="USD", to_currency="JPY")], [1875]),
    _q("chain-interest-usd", "chain", "compound_interest convert_currency",
       "I invest 2000 EUR at 5% a year for 2 years. What is the final balance in USD?",
       [_c("compound_interest", principal=2000, annual_rate_percent=5, years=2),
        _c("convert_currency", amount=2205, from_currency="EUR", to_currency="USD")], [2756.25]),
    _q("chain-flight-mxn", "chain", "convert_currency get_flight_status",
       "Get the fare of flight TR9031 and convert it from USD to MXN.",
       [_c("get_flight_status", flight_number="TR9031"),
        _c("convert_currency", amount=250, from_currency="USD", to_currency="MXN")], [5000]),

    # ------------------------------------------------------------------ two_entities: one tool, two entities
    _q("two-utc", "two_entities", "get_utc_offset", "What are the UTC offsets of Tokyo and Lima?",
       [_c("get_utc_offset", city="Tokyo"), _c("get_utc_offset", city="Lima")], [_PLUS9, _MINUS5]),
    _q("two-stock", "two_entities", "get_stock_quote convert_currency",
       "Compare the share prices of NOVA and QRTZ.",
       [_c("get_stock_quote", ticker="NOVA"), _c("get_stock_quote", ticker="QRTZ")], [182.4, 47.15]),
    _q("two-books", "two_entities", "find_book",
       "Who are the authors of Glass Rivers and of Lanterns over Kell?",
       [_c("find_book", title="Glass Rivers"), _c("find_book", title="Lanterns over Kell")],
       ["Tomas Ekwueme", "Oskar Brandt"]),
    _q("two-spanish", "two_entities", "translate_to_spanish find_book",
       "translate cheese and key into spanish",
       [_c("translate_to_spanish", word="cheese"), _c("translate_to_spanish", word="key")], ["queso", "llave"]),
    _q("two-flights", "two_entities", "get_flight_status",
       "What is the status of flights AV66 and LM207?",
       [_c("get_flight_status", flight_number="AV66"), _c("get_flight_status", flight_number="LM207")],
       ["cancelled", "on time"]),
    _q("two-recipes", "two_entities", "recipe_calories compute_bmi",
       "How many calories per serving do lentil soup and banana bread have?",
       [_c("recipe_calories", recipe="lentil soup"), _c("recipe_calories", recipe="banana bread")], [310, 260]),
    _q("two-rooms", "two_entities", "room_availability",
       "How many people fit in the Juniper room and in the Willow room?",
       [_c("room_availability", room="Juniper"), _c("room_availability", room="Willow")], [8, 12]),
    _q("two-postal", "two_entities", "lookup_postal_code shipping_cost",
       "Which towns have the postal codes 40213 and 10442?",
       [_c("lookup_postal_code", postal_code="40213"), _c("lookup_postal_code", postal_code="10442")],
       ["Harwick", "Oakhollow"]),
    _q("two-temps", "two_entities", "celsius_to_fahrenheit fahrenheit_to_celsius",
       "Convert 20 °C and 35 °C to Fahrenheit.",
       [_c("celsius_to_fahrenheit", celsius=20), _c("celsius_to_fahrenheit", celsius=35)], [68, 95]),
)


def questions_by_id() -> dict[str, Question]:
    return {q.id: q for q in QUESTIONS}
