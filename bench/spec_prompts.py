"""Chat prompts for the speculative-decoding rows: input-grounded tasks (the answer copies much
of a text the prompt gives: rewrite, code edit, extraction, summary) and open-ended ones (the
answer has nothing to copy: prompt-lookup drafts mostly miss).

Fixed texts, written here, so every engine and every run gets the same prompts; each prompt is
one user message rendered with the model's chat template.
"""

from __future__ import annotations

_PARAGRAPH = (
    "The lighthouse on Gull Point was built in 1871 to guide fishing boats past the reef that "
    "had sunk three schooners in a single winter. Its first keeper, Martha Breen, kept the lamp "
    "lit for forty-two years, trimming the wick every four hours and logging the weather in a "
    "leather book that the town museum still displays. In 1938 the oil lamp was replaced by an "
    "electric beam visible for eighteen miles, and in 1979 the station was automated and the "
    "keeper's cottage was sold to the county, which now rents it to visiting painters."
)

_TYPOS = (
    "Our team wil meet on tuesday at the main libary to revew the budjet for the new year. "
    "Please bring you're laptop, the lastest sales figures and any questons you have about "
    "the propsed changes to the travel polcy. Coffee and sandwitches will be provided."
)

_CODE = '''def average_order_value(orders):
    total = 0
    count = 0
    for order in orders:
        if order["status"] == "cancelled":
            continue
        total = total + order["amount"]
        count = count + 1
    if count == 0:
        return 0
    return total / count
'''

_CODE2 = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, quantity):
        self.items[name] = self.items.get(name, 0) + quantity

    def remove(self, name, quantity):
        if self.items.get(name, 0) < quantity:
            raise ValueError("not enough " + name)
        self.items[name] -= quantity

    def count(self, name):
        return self.items.get(name, 0)
'''

# (name, user message): the answer is mostly text of the prompt.
GROUNDED: tuple[tuple[str, str], ...] = (
    ("fix-typos", "Rewrite the following text with its spelling mistakes corrected. Reply with "
                  "the corrected text only.\n\n" + _TYPOS),
    ("rename-variable", "In the following Python function, rename the variable `total` to "
                        "`amount_sum`. Reply with the whole updated function only.\n\n" + _CODE),
    ("add-docstrings", "Add a one-line docstring to every method of this Python class. Reply "
                       "with the whole class.\n\n" + _CODE2),
    ("quote-sentences", "Copy, word for word, the sentences of this text that contain a year."
                        "\n\n" + _PARAGRAPH),
    ("summarize", "Summarize this text in two sentences, reusing its own words.\n\n"
                  + _PARAGRAPH),
    ("to-bullets", "Rewrite this text as a bulleted list, one bullet per sentence, keeping "
                   "every sentence's words.\n\n" + _PARAGRAPH),
)

# (name, user message): nothing to copy.
OPEN_ENDED: tuple[tuple[str, str], ...] = (
    ("poem", "Write a short poem about autumn in the mountains."),
    ("advice", "Give me five tips for learning a new language."),
    ("story", "Tell me a short story about a robot who learns to paint."),
)


def chat_ids(tokenizer, message: str) -> list[int]:
    """The prompt ids of one user message in the model's chat template (generation prompt
    added), as the server builds them."""
    return list(tokenizer.encode_chat([{"role": "user", "content": message}])[1])
