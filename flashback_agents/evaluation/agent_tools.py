"""The tools of ``flashback-agents eval agents`` (:data:`TOOLS`): plain functions over small fixed
tables of invented values, from tool families the training-data generator never produces.

The tool families (currency exchange at fixed rates, temperature scales, stock quotes, flight status, a
library catalogue, recipe calories, UTC offsets, BMI, bill splitting, an English-Spanish dictionary,
postal codes, movie showtimes, compound interest, number bases, shipping cost, meeting rooms, match
results) are disjoint from the generator's (arithmetic, length / weight / volume units, price /
employee / population tables, profile / invoice / ticket records, dates, string tools, document
search, weather). Every tool is a plain function with type hints and a one-line docstring
(``langchain_core.tools.tool`` and LlamaIndex ``FunctionTool.from_defaults`` both wrap it),
deterministic over its table (this module has no ``from __future__ import annotations``: LlamaIndex
puts the signature in the tool description, and it reads as users' would, ``amount: float`` rather
than ``amount: 'float'``). An unknown key returns an error string (what a real tool would say)
instead of raising, so a wrong argument costs the agent a step, not the run.
"""

import inspect
from typing import Any, Callable

__all__ = ["TOOLS", "tool_functions", "tool_signature"]


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
