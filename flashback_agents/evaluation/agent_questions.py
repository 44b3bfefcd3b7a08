"""The held-out agent question set of ``flashback-agents eval agents``: hand-written questions over tool
families that the training-data generator never produces, by category.

Nothing here is trained on. The tools and their tables live in :mod:`.agent_tools` (re-exported here).

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

from dataclasses import dataclass, field
from typing import Any, Union

from .agent_tools import TOOLS, tool_functions, tool_signature

__all__ = ["CATEGORIES", "QUESTIONS", "TOOLS", "ExpectedCall", "Question", "questions_by_id", "tool_functions",
           "tool_signature"]

CATEGORIES = ("single", "choice", "no_tool_needed", "no_fit", "chain", "two_entities")

Accept = Union[str, float, int, tuple]


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
