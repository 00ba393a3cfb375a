"""Labelled task descriptions for routing by description, and a keyword baseline to beat.

``labelled_descriptions(n, seed)`` writes ``n`` rows ``{"type", "description"}`` over the
eight types of ``TYPES``, deterministic for a seed. The wording varies the way people
write requests: a verb phrase or a request noun ("need a summary of ..."), several
templates and word orders, optional details, context and politeness, and noise on top
(typos, casing, punctuation, stray words). Types share words on purpose: "check" asks for
a code review or a look at numbers, "look into" for a bug hunt or web research, "the Q3
report" is summarised, translated or analysed, "draft" opens an email or documentation.
So no single word tells a type apart, while the combination of words does.

``KeywordBaseline`` is the naive router the classifier must beat: each type's most
frequent distinctive word, learnt from training rows.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

MODULES = ("billing", "auth", "search", "checkout", "scheduler", "payments", "ingest",
           "notifications", "reporting", "gateway")
DOCS = ("design doc", "Q3 report", "quarterly report", "release notes", "onboarding guide",
        "security policy", "product spec", "roadmap", "customer feedback", "incident report")
LANGUAGES = ("French", "German", "Spanish", "Japanese", "Portuguese", "Italian", "Korean",
             "Dutch", "Polish", "Chinese")
VENDORS = ("Stripe", "Datadog", "Snowflake", "Twilio", "Okta", "Salesforce", "Zendesk")
FIELDS = ("vector databases", "LLM evaluation", "data privacy", "edge caching",
          "carbon accounting", "fraud detection", "speech recognition")


@dataclass(frozen=True)
class TypeWords:
    asks: tuple[str, ...]  # verb phrases taking the object: "review", "look into"
    nouns: tuple[str, ...]  # request nouns taking the object: "a review of"
    short: tuple[str, ...]  # one-word names of the work: "review needed"
    objects: tuple[str, ...]  # what the work is on; {module} {doc} {lang} ... are filled in
    details: tuple[str, ...]  # optional trailing clause
    detail_rate: float = 0.5  # how often a detail is added


TYPES: dict[str, TypeWords] = {
    "code_review": TypeWords(
        asks=("review", "look over", "go through", "check", "critique", "give feedback on",
              "sanity-check", "audit", "do a pass over", "take a look at", "go over"),
        nouns=("a code review of", "a second pair of eyes on", "feedback on", "a review of",
               "comments on"),
        short=("review", "code review", "feedback", "approval"),
        objects=("the pull request", "PR #{n}", "the diff", "this patch", "the merge request",
                 "the changes in {module}", "commit {hash}", "the refactor of {module}",
                 "the new {module} module", "branch feature/{module}-{n}"),
        details=("before we merge", "and leave inline comments", "focus on naming and style",
                 "look for race conditions", "check the test coverage",
                 "flag anything risky", "approve it if it looks fine", "CI is green already",
                 "the author is new to the codebase")),
    "bug_fix": TypeWords(
        asks=("fix", "debug", "repair", "patch", "find the cause of", "track down", "resolve",
              "look into", "investigate", "troubleshoot", "check", "take a look at"),
        nouns=("a fix for", "a hotfix for", "a patch for", "help with", "the root cause of"),
        short=("fix", "hotfix", "debugging", "bugfix"),
        objects=("the crash in {module}", "the null pointer exception in {module}",
                 "the failing test in {module}", "the memory leak in {module}",
                 "the {module} timeout", "the off-by-one error in {module}", "ticket BUG-{n}",
                 "the regression in {module}", "the 500 errors from {module}",
                 "the broken build", "the flaky {module} tests"),
        details=("stack trace attached", "it started after the last deploy",
                 "reproduce it first", "users keep hitting it", "add a regression test",
                 "it only happens on prod", "it segfaults on startup",
                 "the logs show a KeyError", "see the traceback in the ticket")),
    "summarize": TypeWords(
        asks=("summarize", "summarise", "sum up", "condense", "recap", "boil down",
              "give me the gist of", "digest", "shorten", "skim and outline", "go over",
              "read through"),
        nouns=("a summary of", "a tl;dr of", "the key points of", "an overview of",
               "a short recap of", "an executive brief on"),
        short=("summary", "tl;dr", "recap", "overview"),
        objects=("the {doc}", "this article", "the meeting transcript", "the email thread",
                 "the research paper", "yesterday's standup notes", "the customer feedback",
                 "the board deck", "the incident postmortem", "the {doc} draft"),
        details=("in five bullet points", "in one paragraph", "keep it under 200 words",
                 "for the leadership team", "highlight decisions and action items",
                 "plain language please", "for people who missed it")),
    "translate": TypeWords(
        asks=("translate", "localize", "localise", "render", "convert", "put", "rewrite",
              "adapt"),
        nouns=("a translation of", "a {lang} version of", "localized copy of",
               "a native {lang} rendering of"),
        short=("translation", "localization", "{lang} version"),
        objects=("the {doc}", "the release notes", "the product page", "the error messages",
                 "the customer email", "the UI strings", "the support article",
                 "the contract", "the app store listing", "the {doc} draft", "the README"),
        details=("into {lang}", "to {lang}", "from English to {lang}", "into {lang}",
                 "for the {lang} market, keep the tone formal", "in {lang}, keep placeholders",
                 "into {lang} with native speaker quality"),
        detail_rate=0.85),
    "data_analysis": TypeWords(
        asks=("analyze", "analyse", "crunch", "compute stats on", "break down", "plot",
              "chart", "compare", "dig into", "check", "run a regression on", "look at",
              "review"),
        nouns=("an analysis of", "statistics on", "a breakdown of", "a chart of",
               "a pivot table of", "a trend line for"),
        short=("analysis", "stats", "chart", "numbers"),
        objects=("the sales figures", "the {module} dataset", "the churn numbers",
                 "the CSV export", "the signup funnel", "the A/B test results",
                 "the latency metrics", "the survey responses", "the revenue by region",
                 "the customer feedback scores", "the {doc} data"),
        details=("by region", "month over month", "and plot the trend",
                 "find correlations", "compute mean and median", "flag outliers",
                 "in a pivot table", "with confidence intervals", "in a notebook",
                 "per cohort")),
    "web_research": TypeWords(
        asks=("research", "look up", "search the web for", "find", "dig up", "gather",
              "investigate", "scout", "survey", "compare", "look into", "check", "look at"),
        nouns=("background research on", "a list of sources on", "a market scan of",
               "a literature search on", "competitive intel on"),
        short=("research", "sources", "market scan", "background"),
        objects=("competitors of {vendor}", "pricing of {vendor} alternatives",
                 "recent papers on {field}", "vendors for {field}",
                 "best practices for {field}", "regulations on {field}",
                 "open-source alternatives to {vendor}", "news about {vendor}",
                 "reviews of {vendor}", "who else works on {field}"),
        details=("with links", "cite your sources", "from the last 12 months", "online",
                 "on the web", "compare at least three", "primary sources only",
                 "include pricing")),
    "draft_email": TypeWords(
        asks=("draft an email to", "write an email to", "compose a note to", "reply to",
              "respond to", "send a message to", "write back to", "email",
              "put together a follow-up for", "draft a reply to"),
        nouns=("an email to", "a reply to", "a follow-up note for", "a message to",
               "a polite answer to"),
        short=("email", "reply", "follow-up", "message"),
        objects=("the customer", "the {vendor} account manager", "the candidate",
                 "the whole team", "our investors", "the landlord", "the client",
                 "the recruiter", "the person who opened the ticket",
                 "our partner at {vendor}"),
        details=("about the delayed shipment", "thanking them for the meeting",
                 "declining politely", "asking for the invoice",
                 "confirming the call on Tuesday", "apologizing for the outage",
                 "keep it friendly", "cc my manager", "about the {doc}"),
        detail_rate=0.7),
    "write_docs": TypeWords(
        asks=("document", "write docs for", "write up", "describe", "explain",
              "add docstrings to", "update the README for", "create a guide for",
              "draft documentation for", "write a how-to for", "write", "draft", "rewrite"),
        nouns=("documentation for", "a README for", "a user guide for", "API docs for",
               "a how-to for", "a runbook for"),
        short=("docs", "documentation", "README", "runbook"),
        objects=("the {module} module", "the new endpoint", "the CLI", "the deploy process",
                 "the config options", "the {module} API", "the onboarding process",
                 "the SDK", "the {module} service", "the setup steps", "the release notes",
                 "the onboarding guide", "the README"),
        details=("with examples", "for new hires", "in markdown", "include a quickstart",
                 "cover the error codes", "for the wiki", "step by step")),
}

CONTEXT = ("for the billing team", "for project Atlas", "re: Q3 planning", "by Friday",
           "asap", "no rush", "when you get a chance", "ahead of the launch",
           "for the Berlin office", "high priority", "for tomorrow's meeting",
           "for the customer call", "before the release")
OPENERS = ("hey,", "hi team,", "quick one:", "fyi", "as discussed,", "per our call,",
           "hello!", "urgent:", "when you can,")
CLOSERS = ("thanks!", "thx", "cheers", "if possible", "please", "ty", "much appreciated")
STRAY = ("uh", "actually", "basically", "really", "just", "also", "maybe", "like", "ok")

_TEMPLATES = (  # (weight, template)
    (5, "{ask} {object}{detail}{context}"),
    (3, "can you {ask} {object}{detail}?"),
    (3, "please {ask} {object}{detail}{context}"),
    (3, "need {noun} {object}{detail}{context}"),
    (2, "{object} - {ask} it{detail}"),
    (2, "{context_lead}, {ask} {object}{detail}"),
    (2, "{noun} {object}{detail}, {context_bare}"),
    (2, "{object}: {short} needed{detail}"),
    (1, "{detail_bare}. {ask} {object}"),
    (1, "i'd like {noun} {object}"),
    (1, "{object}{detail}"),  # no ask at all: the object and detail must carry the type
)
_WEIGHTS = [w for w, _ in _TEMPLATES]
_SLOT = re.compile(r"\{(\w+)\}")
_KEYBOARD = {c: n for c, n in zip("qwertyuiopasdfghjklzxcvbnm", "wqretyuoipsadgfhkjlxzvcmnb",
                                  strict=True)}


def _fill(text: str, rng: random.Random, lang: str) -> str:
    """Fill {module}, {doc}, {lang} (one language per description), {vendor}, ... slots."""
    values = {"module": lambda: rng.choice(MODULES), "doc": lambda: rng.choice(DOCS),
              "lang": lambda: lang, "vendor": lambda: rng.choice(VENDORS),
              "field": lambda: rng.choice(FIELDS), "n": lambda: str(rng.randint(12, 4999)),
              "hash": lambda: f"{rng.getrandbits(28):07x}"}
    return _SLOT.sub(lambda m: values[m.group(1)](), text)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop one
        return word[:i] + word[i + 1:]
    if kind == 2:  # double one
        return word[:i] + word[i] + word[i:]
    return word[:i] + _KEYBOARD.get(word[i].lower(), word[i]) + word[i + 1:]  # fat finger


def _noisy(text: str, rng: random.Random, typo_rate: float) -> str:
    words = text.split()
    words = [_typo(w, rng) if len(w) >= 4 and rng.random() < typo_rate else w for w in words]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), rng.choice(STRAY))
    if rng.random() < 0.2:
        words.insert(0, rng.choice(OPENERS))
    if rng.random() < 0.2:
        words.append(rng.choice(CLOSERS))
    text = " ".join(words)
    casing = rng.random()
    if casing < 0.07:
        text = text.upper()
    elif casing < 0.45:
        text = text[:1].upper() + text[1:]
    elif casing < 0.55:
        text = text.title()
    ending = rng.random()
    if ending < 0.15:
        text = text.rstrip("?.!") + rng.choice(("!!", "...", ".", " ?", "!?"))
    elif ending < 0.3:
        text = text.rstrip("?.!")
    return text


def describe(task_type: str, rng: random.Random, typo_rate: float = 0.08) -> str:
    """One noisy description of work of ``task_type``."""
    words = TYPES[task_type]
    template = rng.choices(_TEMPLATES, _WEIGHTS)[0][1]
    has_detail = rng.random() < words.detail_rate
    detail = rng.choice(words.details)
    context = rng.choice(CONTEXT)
    parts = {
        "ask": rng.choice(words.asks), "noun": rng.choice(words.nouns),
        "short": rng.choice(words.short), "object": rng.choice(words.objects),
        "detail": f" {detail}" if has_detail else "", "detail_bare": detail,
        "context": f" {context}" if rng.random() < 0.35 else "",
        "context_lead": context, "context_bare": context,
    }
    text = _SLOT.sub(lambda m: parts[m.group(1)], template)
    text = _fill(text, rng, rng.choice(LANGUAGES))
    return _noisy(text, rng, typo_rate)


def labelled_descriptions(n: int = 600, seed: int = 0, typo_rate: float = 0.08) -> list[dict]:
    """``n`` rows ``{"type", "description"}``, types in equal shares, shuffled.

    Deterministic for a seed, and a prefix of a longer run for the same seed is not
    promised (the shuffle covers all ``n``).
    """
    rng = random.Random(seed)
    names = sorted(TYPES)
    labels = [names[i % len(names)] for i in range(n)]
    rng.shuffle(labels)
    return [{"type": t, "description": describe(t, rng, typo_rate)} for t in labels]


def split(rows: list[dict], train: int = 500) -> tuple[list[dict], list[dict]]:
    """The first ``train`` rows to learn from, the rest held out."""
    return rows[:train], rows[train:]


# ---------------------------------------------------------------- the keyword baseline

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def words_of(description: str) -> set[str]:
    return set(_WORD.findall(description.lower()))


class KeywordBaseline:
    """Routes by one keyword per type: the word most frequent in that type's training
    descriptions among the words the type owns (found in more of its descriptions than in
    any other type's). A description holding several types' keywords goes to the type
    whose keyword was most precise in training; one holding none to the commonest type.

    Owning a word by plurality lets function words ("into", "to") be keywords: on this data
    that scores higher than demanding a share of 60 % to 100 % of the word's rows."""

    def __init__(self, rows: list[dict]):
        per_type: dict[str, Counter] = {}
        for row in rows:
            per_type.setdefault(row["type"], Counter()).update(words_of(row["description"]))
        everywhere = Counter()
        for counts in per_type.values():
            everywhere.update(counts)
        self.keywords: dict[str, str] = {}
        self.precision: dict[str, float] = {}
        for task_type, counts in per_type.items():
            owned = [(c, w) for w, c in counts.items()
                     if all(c > other.get(w, 0) for t, other in per_type.items()
                            if t != task_type)]
            if owned:
                count, word = max(owned)
                self.keywords[task_type] = word
                self.precision[task_type] = count / everywhere[word]
        sizes = Counter(row["type"] for row in rows)
        self.commonest = max(sorted(sizes), key=sizes.__getitem__)

    def route(self, description: str) -> str:
        present = words_of(description)
        hits = [t for t, w in self.keywords.items() if w in present]
        if not hits:
            return self.commonest
        return max(sorted(hits), key=self.precision.__getitem__)

    def accuracy(self, rows: list[dict]) -> float:
        return sum(self.route(r["description"]) == r["type"] for r in rows) / len(rows)
