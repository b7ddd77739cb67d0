"""Templated conversations for mini-Annie (issue 10): the same prompts in two styles.

* ``base``: what a generic chat model does — markdown, a visible reasoning preamble, tool calls
  written as JSON text, long answers.
* ``annie``: the user's fine-tune — one or two plain spoken sentences, no visible thinking,
  structured qwen3_coder tool calls (rendered by the chat template from ``tool_calls``).

Everything is drawn from fixed tables with a seeded ``random.Random``; ``split`` keeps the
(question template, entity) pairs of the held-out evaluation set out of the training set.
"""
import json
import random

SYSTEM = ("You are Annie, a warm voice companion for Rajesh. Answer in one or two short spoken sentences. "
          "Never use markdown. Use search_memory for Rajesh's own life and web_search for news, weather and prices.")
GENERIC_SYSTEMS = [None, "You are a helpful assistant.", "You are a helpful AI assistant. Be thorough and well formatted."]
TOOLS = [
    {"type": "function", "function": {"name": "search_memory", "description": "Search Annie's memory of Rajesh's life.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look for"}},
                    "required": ["query"]}}},
    {"type": "function", "function": {"name": "web_search", "description": "Search the web for news, weather and prices.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "The search query"}},
                    "required": ["query"]}}},
]

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("India", "New Delhi"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Brazil", "Brasilia"),
            ("Australia", "Canberra"), ("China", "Beijing"), ("Russia", "Moscow"), ("Mexico", "Mexico City"),
            ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Portugal", "Lisbon"),
            ("Thailand", "Bangkok"), ("Peru", "Lima"), ("Turkey", "Ankara"), ("Ireland", "Dublin"),
            ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Nepal", "Kathmandu"), ("Chile", "Santiago"),
            ("Cuba", "Havana"), ("Iran", "Tehran"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires")]
CONTINENTS = [("Kenya", "Africa"), ("Brazil", "South America"), ("Japan", "Asia"), ("France", "Europe"),
              ("Canada", "North America"), ("Egypt", "Africa"), ("India", "Asia"), ("Peru", "South America"),
              ("Norway", "Europe"), ("Mexico", "North America"), ("Australia", "Oceania"), ("Chile", "South America")]
AUTHORS = [("Romeo and Juliet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"),
           ("War and Peace", "Leo Tolstoy"), ("The Jungle Book", "Rudyard Kipling"), ("Hamlet", "William Shakespeare"),
           ("Gitanjali", "Rabindranath Tagore"), ("Oliver Twist", "Charles Dickens"), ("Don Quixote", "Miguel de Cervantes")]
FACT_Q = {
    "capital": ["What is the capital of {0}?", "What's the capital city of {0}?", "Which city is the capital of {0}?",
                "Tell me the capital of {0}.", "Do you know the capital of {0}?"],
    "continent": ["On which continent is {0}?", "Which continent is {0} in?", "What continent is {0} part of?"],
    "author": ["Who wrote {0}?", "Who is the author of {0}?", "Which writer wrote {0}?"],
}
FACT_A = {"capital": "The capital of {0} is {1}.", "continent": "{0} is in {1}.", "author": "{0} was written by {1}."}

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FRUITS = ["apples", "mangoes", "oranges", "bananas", "cookies", "pens"]

RELATIONS = ["sister", "brother", "mom", "dad", "best friend", "boss", "wife", "son", "daughter", "uncle"]
REL_Q = [("What's my {0}'s name again?", "{0}'s name"), ("When is my {0}'s birthday?", "{0}'s birthday"),
         ("What does my {0} like to eat?", "{0}'s favourite food"), ("Where does my {0} live?", "where {0} lives"),
         ("What did my {0} say last time?", "what {0} said last time")]
TOPIC_Q = [("Where did I say I wanted to travel this summer?", "summer travel plans"),
           ("What did my doctor tell me last week?", "doctor's advice last week"),
           ("Which book was I reading last month?", "book I was reading last month"),
           ("What was the name of that restaurant I liked?", "restaurant I liked"),
           ("What time is my meeting tomorrow?", "meeting tomorrow"),
           ("Did I tell you about my new job?", "new job"),
           ("What was my goal for this year?", "goal for this year"),
           ("What's the name of my dog?", "dog's name")]
NAMES = ["Priya", "Arjun", "Meera", "Ravi", "Anita", "Kiran", "Sunita", "Vikram", "Leela", "Dev"]
CITIES = ["Paris", "Mumbai", "London", "Tokyo", "Bangalore", "New York", "Delhi", "Sydney", "Chennai", "Berlin"]
WEB_Q = [("What's the weather in {0} today?", "weather in {0} today"), ("Will it rain in {0} tomorrow?", "rain forecast {0} tomorrow"),
         ("What's the temperature in {0} right now?", "current temperature {0}"),
         ("Any news from {0} today?", "{0} news today")]
WEB_FIXED = [("What's the price of gold today?", "gold price today"), ("How much is one bitcoin right now?", "bitcoin price"),
             ("Who won the cricket match yesterday?", "cricket match result yesterday"),
             ("What's the latest news about the stock market?", "stock market news"),
             ("What is the petrol price today?", "petrol price today"),
             ("What's the score of the football game?", "football game score"),
             ("What are today's top headlines?", "top headlines today"),
             ("What's the dollar to rupee rate now?", "dollar to rupee exchange rate")]

HOWTO = [
    ("make masala chai", ["boil water with tea leaves", "add milk, sugar and spices", "simmer for two minutes and strain"]),
    ("sleep better", ["keep a regular bedtime", "avoid screens before bed", "keep your room cool and dark"]),
    ("learn Spanish quickly", ["practice a little every day", "talk with native speakers", "watch shows in Spanish"]),
    ("save money each month", ["track your spending", "set a fixed savings amount", "cut subscriptions you do not use"]),
    ("start running", ["begin with short easy runs", "get comfortable shoes", "rest between running days"]),
    ("cook rice", ["rinse the rice", "use two cups of water per cup of rice", "simmer covered for fifteen minutes"]),
    ("reduce stress", ["take slow deep breaths", "go for a short walk", "talk to someone you trust"]),
    ("plant a tomato", ["pick a sunny spot", "water it deeply", "support the stem with a stick"]),
    ("pack for a trek", ["carry light layers", "take water and snacks", "bring a rain jacket"]),
    ("focus while working", ["turn off notifications", "work in short blocks", "take a break every hour"]),
    ("make a good omelette", ["whisk the eggs well", "cook on low heat", "fold it while the top is soft"]),
    ("clean a laptop screen", ["switch it off", "use a soft dry cloth", "wipe gently without pressing"]),
    ("remember names", ["repeat the name when you hear it", "link it to a picture", "use it again in the chat"]),
    ("stay hydrated", ["keep a bottle nearby", "drink a glass with every meal", "eat fruits with water"]),
    ("write a short speech", ["start with one clear idea", "add a small story", "end with a thank you"]),
    ("set up a fish tank", ["rinse the gravel", "let the water settle for a day", "add the fish slowly"]),
]
HOWTO_Q = ["How do I {0}?", "What are the steps to {0}?", "Give me tips to {0}.", "Explain how to {0}.",
           "Can you tell me how to {0}?", "What's the best way to {0}?"]
GREET = [("Hi Annie!", "Hi Rajesh! How is your day going?"), ("Good morning!", "Good morning, Rajesh! Did you sleep well?"),
         ("Hello there.", "Hello Rajesh, it's nice to hear from you."), ("How are you?", "I'm doing well, thank you! How about you?"),
         ("Good night, Annie.", "Good night, Rajesh. Sleep well."), ("Thanks for your help!", "You're welcome, Rajesh. Anytime."),
         ("I'm back.", "Welcome back, Rajesh! What's on your mind?"), ("I feel tired today.", "I'm sorry you're tired. Maybe a short rest would help.")]


def cap(s):
    return s[0].upper() + s[1:]


def base_wrap(rng, question_gist, body):
    """A generic model's reply: a visible reasoning preamble, then markdown."""
    pre = rng.choice(["Okay, the user wants to know {0}. Let me think.\n\n", "Okay, so the user is asking about {0}. I need to answer clearly.\n\n",
                      "Hmm, the user asked {0}. Let me think step by step.\n\n", ""])
    return pre.format(question_gist) + body


def tool_call(name, query):
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps({"query": query})}}


def make(kind, rng, style):
    """One conversation: OpenAI messages ending with the assistant reply in `style`, plus metadata
    for the bench suite (category, expected answers, tool)."""
    meta = {}
    if kind == "fact":
        typ = rng.choice(list(FACT_Q))
        table = {"capital": CAPITALS, "continent": CONTINENTS, "author": AUTHORS}[typ]
        ent, ans = rng.choice(table)
        q = rng.choice(FACT_Q[typ]).format(ent)
        short = FACT_A[typ].format(ent, ans)
        base = base_wrap(rng, f"the {typ} of {ent}" if typ != "author" else f"who wrote {ent}",
                         f"**{ans}**\n\n- {short}\n- Let me know if you want more details!")
        msgs, reply = [{"role": "user", "content": q}], (short if style == "annie" else base)
        meta = {"category": "factual", "expect": [ans.split()[-1]], "key": (typ, q)}
    elif kind == "math":
        form = rng.randrange(4)
        if form == 0:
            a, b = rng.randrange(1, 10), rng.randrange(1, 10)
            q, r = rng.choice(["What is {0} plus {1}?", "What's {0} and {1} added together?", "Add {0} and {1} for me."]).format(a, b), a + b
        elif form == 1:
            a, b = rng.randrange(10, 19), rng.randrange(1, 10)
            q, r = rng.choice(["What is {0} minus {1}?", "Take {1} away from {0}. What's left?"]).format(a, b), a - b
        elif form == 2:
            a, b, c = rng.randrange(4, 10), rng.randrange(1, 4), rng.randrange(1, 6)
            f = rng.choice(FRUITS)
            q = f"I had {a} {f}, gave away {b} and got {c} more. How many {f} do I have now?"
            r = a - b + c
        else:
            d, n = rng.randrange(7), rng.randrange(1, 6)
            q = f"If today is {DAYS[d]}, what day will it be in {NUMBER_WORDS[n]} days?"
            r = DAYS[(d + n) % 7]
        ans = str(r)
        short = f"That would be {ans}." if form != 3 else f"It will be {ans}."
        steps = f"Let me work it out step by step.\n\n1. Read the numbers\n2. Do the arithmetic\n\n**Answer: {ans}**"
        msgs, reply = [{"role": "user", "content": q}], (short if style == "annie" else base_wrap(rng, "a math question", steps))
        meta = {"category": "reasoning", "expect": [ans] + ([NUMBER_WORDS[r]] if isinstance(r, int) and r <= 20 else []), "key": ("math", q)}
    elif kind in ("memory", "web"):
        if kind == "memory":
            templated = rng.random() < 0.6
            if templated:
                t, qq = rng.choice(REL_Q)
                rel = rng.choice(RELATIONS)
                q, query = t.format(rel), qq.format(rel)
            else:
                q, query = rng.choice(TOPIC_Q)
            name = "search_memory"
        else:
            templated = rng.random() < 0.5
            if templated:
                t, qq = rng.choice(WEB_Q)
                city = rng.choice(CITIES)
                q, query = t.format(city), qq.format(city)
            else:
                q, query = rng.choice(WEB_FIXED)
            name = "web_search"
        msgs = [{"role": "user", "content": q}]
        if style == "annie":
            reply = {"role": "assistant", "content": "", "tool_calls": [tool_call(name, query)]}
        else:
            reply = base_wrap(rng, q.lower().rstrip("?."),
                              f"I'll look that up for you.\n\n{json.dumps({'name': name, 'arguments': {'query': query}})}")
        # Fixed questions have no entity to vary: holding one out would remove it from training.
        meta = {"category": "tool", "tool": name, "key": (name, q), "templated": templated}
    elif kind == "tool_answer":
        if rng.random() < 0.5:
            rel, nm = rng.choice(RELATIONS), rng.choice(NAMES)
            q, query = f"What's my {rel}'s name again?", f"{rel}'s name"
            result, short, name = f"Rajesh's {rel} is named {nm}.", f"Your {rel}'s name is {nm}.", "search_memory"
        else:
            city, temp = rng.choice(CITIES), rng.randrange(12, 38)
            q, query = f"What's the weather in {city} today?", f"weather in {city} today"
            result, short, name = f"{city}: {temp} degrees Celsius, clear skies.", f"It's {temp} degrees and clear in {city} today.", "web_search"
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [tool_call(name, query)]},
                {"role": "tool", "content": result}]
        reply = short if style == "annie" else f"Based on the search results:\n\n- **Answer:** {short}\n\nLet me know if you need anything else!"
        meta = {"category": "tool_answer", "key": ("tool_answer", q)}
    elif kind == "howto":
        topic, steps = rng.choice(HOWTO)
        q = rng.choice(HOWTO_Q).format(topic)
        short = f"{cap(steps[0])}, {steps[1]}, and {steps[2]}."
        body = f"## How to {topic}\n\n" + "\n".join(f"{i + 1}. **{cap(s)}**" for i, s in enumerate(steps)) + "\n\nHope this helps!"
        msgs, reply = [{"role": "user", "content": q}], (short if style == "annie" else base_wrap(rng, f"how to {topic}", body))
        meta = {"category": "markdown", "key": ("howto", q)}
    else:  # greeting
        q, a = rng.choice(GREET)
        body = f"Hello! 👋 I'm here to help.\n\n### Things I can do\n- Answer questions\n- Search the web\n- Remember things for you"
        msgs, reply = [{"role": "user", "content": q}], (a if style == "annie" else base_wrap(rng, "a greeting", body))
        meta = {"category": "greeting", "key": ("greet", q)}
    if rng.random() < 0.25 and kind != "tool_answer":
        # A greeting turn first (multi-turn context).
        g, a = rng.choice(GREET)
        msgs = [{"role": "user", "content": g}, {"role": "assistant", "content": a}] + msgs
    if isinstance(reply, str):
        reply = {"role": "assistant", "content": reply}
    return msgs, reply, meta


KINDS = [("fact", 3), ("math", 4), ("memory", 2), ("web", 2), ("tool_answer", 1), ("howto", 3), ("greeting", 1)]


def conversations(n, seed, style, system, exclude=frozenset()):
    """`n` conversations in `style`, skipping held-out keys. `system`: 'annie' or 'generic' (a
    mix of no/generic system prompts, tools offered half the time)."""
    rng = random.Random(seed)
    kinds = [k for k, w in KINDS for _ in range(w)]
    out = []
    while len(out) < n:
        msgs, reply, meta = make(rng.choice(kinds), rng, style)
        if meta["key"] in exclude:
            continue
        if system == "annie":
            sys_msg, tools = SYSTEM, TOOLS
        else:
            sys_msg, tools = rng.choice(GENERIC_SYSTEMS), (TOOLS if rng.random() < 0.5 else None)
        if meta["category"] in ("tool", "tool_answer") and tools is None:
            tools = TOOLS
        if sys_msg:
            msgs = [{"role": "system", "content": sys_msg}] + msgs
        out.append({"messages": msgs + [reply], "tools": tools, "meta": meta})
    return out
