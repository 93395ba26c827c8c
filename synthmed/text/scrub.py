"""Caption scrubbing: identifiers, dates and de-identification markers taken out of free text before it
leaves the machine (an LLM request) or trains a generator.

A documented rule set, not a library: presidio needs spaCy models downloaded at run time (no use offline),
and scrubadub finds e-mails, phones and URLs but neither dates, record numbers nor the markers below, and
pulls in scikit-learn and textblob for names. Radiology captions are short and formulaic; regular
expressions over the forms identifiers take in them are predictable, fast and testable. Each rule below
is tested against report sentences and against ordinary clinical text that must pass untouched
("T2-weighted", "C5-C6", "L4/L5", "1.5 T", "3 cm", "grade 2", "axial slice 12", "1:10").

Categories (the keys of the counts), what each rule finds, and what it becomes:

==========  ==========================================================  ==========================
category    finds                                                       becomes
==========  ==========================================================  ==========================
markers     MIMIC ``[** ... **]``, MIMIC-CXR ``___``, IU X-ray/OpenI    removed
            ``XXXX``, ``<PHI>``/``<NAME>...</NAME>`` tags, ``[REDACTED]``,
            ``[Patient Name]``, Pitt De-ID ``**NAME[...]``, ``**ID-NUM``
urls        ``https://...``, ``www....``                                removed
emails      ``jane.doe@example.org``                                    removed
phones      ``(555) 123-4567``, ``+44 20 7946 0958``, ``pager 4-1234``  removed
dates       ``2021-03-04``, ``03/04/2021``, ``4 March 2021``,           removed, with the
            ``Mar 4, 2021``, ``March 2021``, ``March 4``, ``20210304``,  preposition that led in
            times ``10:30``, ``9:15 pm``, ``1430 hours``                 ("on", "at", "dated", ...)
ages        ages over 89: ``92-year-old``, ``95 yo``, ``aged 91``         the number becomes ``90+``
ids         ``MRN: 1234567``, ``Acc# A12345``, ``Patient ID 77-1234``,   removed
            ``123-45-6789``, any run of 5 or more digits, ``AB1234567``
names       the words after a title (Dr./Mr./Mrs./Ms./Miss/Prof.),      removed, with the title
            ``Name: Jane Doe``, ``Dictated by John Smith``
==========  ==========================================================  ==========================

Removal, not a category token ("[DATE]"), for two reasons. A token is a constant string that recurs in
many captions and means nothing in the image: it is exactly what a diffusion model memorises, the
failure the de-identification markers cause in the first place (arXiv 2502.07516); and a caption reads
better for both the text encoder and an LLM without it. The tidying that follows a removal only touches
the text around it: the preposition that led into a removed date ("seen on 03/04/2021." -> "seen."), a
preposition left dangling before punctuation or another preposition ("discussed with Dr. ___ by ___ at
10:30 by phone" -> "discussed by phone"), the article before a removed age ("an ___-year-old man" ->
"a man"), doubled punctuation and spaces, and the capital of a sentence whose first words went. Ages
over 89 keep what HIPAA's Safe Harbor allows ("90+") because the age group is image content.
A caption with none of the forms above comes back unchanged, byte for byte.

What the rules do not find: names without a title or label ("seen by John"), bare years ("2019"),
day-month without a year in figures ("3/4" is also a fraction), street addresses, and institution
names. Free-text reports from a real export need a human look before training on them; these rules
catch the structured identifiers and the markers, which are what repeats.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

CATEGORIES = ("markers", "urls", "emails", "phones", "dates", "ages", "ids", "names")

# Private-use characters mark removed spans until the tidy pass closes them (stripped from the input first).
_GAP, _WHEN, _CAP = "\ue000", "\ue001", "\ue002"  # a removed span; a removed date/time; capitalise next letter
_MARKS = _GAP + _WHEN
_ANY = f"[{_MARKS}]"

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_IMONTH = f"(?i:{_MONTH})"  # with a year, the case does not matter ("04-MAR-2021")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_YEAR = r"(?:19|20)\d{2}"
_CLOCK = r"(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?"
_TITLE = r"\b(?:Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Doctor|Professor)\b\.?"  # capitalised only: "MS lesions" is no title
_NAME_WORD = r"[A-Z][a-z]*(?:[A-Z][a-z]+)?(?:['’-][A-Z]?[a-z]+)*\b"  # Smith, McDonald, O'Brien, Smith-Jones
_CAPS_WORD = r"[A-Z]{2,}(?:['’-][A-Z]+)*\b"
_INITIAL = r"[A-Z]\.[ ]?"
_CREDENTIALS = r"(?:,?[ ](?:(?:MD|DO|PhD|MBBS|FRCR|FRCPC|RN|NP|PA-C)\b|M\.D\.|D\.O\.|Ph\.D\.))*"  # ", MD" goes too
_NAME = (rf"(?:{_INITIAL})*(?:{_NAME_WORD}(?:[ ](?:{_INITIAL})*{_NAME_WORD}){{0,2}}"
         rf"|{_CAPS_WORD}(?:[ ]{_CAPS_WORD}){{0,2}}){_CREDENTIALS}")
_ID_LABEL = (r"(?i:\b(?:MRN|MR\s?#|MR\s?No\.?|Med(?:ical)?\s+Rec(?:ord)?\.?\s*(?:No\.?|Number|#)?|"
             r"Acc(?:ession)?\.?\s*(?:No\.?|Number|#)|Acc\s?#|Accession|(?:Patient|Study|Exam|Visit)\s+ID|PID|"
             r"(?:Case|Record|Account|Encounter|NHS|Hospital)\s+(?:No\.?|Number|#)|SSN|ID)(?![\w])\.?)")
_AGE = r"(?:9\d|1[01]\d)"  # 90-119
_UNITS = r"(?:%|/|(?:mm|cm|ml|mL|mg|kg|g|HU|Gy|cGy|cells|copies|IU|U/L)\b)"  # "12345 mm" is no record number


def _dmy(m: re.Match) -> str | None:
    """03/04/2021-style: plausible as day/month either way round; a dotted short year needs two-digit fields."""
    a, b = int(m["a"]), int(m["b"])
    if a > 12 and b > 12:
        return None
    if m["sep"] == "." and len(m["y"]) == 2 and (len(m["a"]) < 2 or len(m["b"]) < 2):
        return None  # "1.2.10" is more likely a version or a list number than a date
    return _WHEN


def _age(m: re.Match) -> str:
    return m.group(0).replace(m["n"], "90+", 1)


# (category, pattern, replacement): replacement a string, or a function of the match returning the
# replacement or None (not this after all). Order matters: markers first (they may hold dates), URLs and
# e-mails before the digit rules, phones and dates before the digit runs that would otherwise take them.
_Rule = tuple[str, re.Pattern, "str | Callable[[re.Match], str | None]"]
_RULES: list[_Rule] = [(c, re.compile(p, f), r) for c, p, f, r in (
    ("markers", r"\[\*\*.*?\*\*\]", re.S, _GAP),  # MIMIC-III/IV: [**Last Name (NamePattern1) 1234**]
    ("markers", r"<(?P<tag>[A-Z][A-Z_-]+)\b[^<>]*>.*?</(?P=tag)\s*>", re.S, _GAP),  # <PHI TYPE="DATE">..</PHI>
    ("markers", r"</?[A-Z][A-Z_-]+\b[^<>]*/?>", 0, _GAP),  # <PHI>, <NAME/>
    ("markers", r"\[\s*(?i:(?:[a-z]+[ _-]){0,2}(?:redacted|removed|anonymi[sz]ed|de-?identified|phi|name|date|"
                r"mrn|id|age|location|hospital|institution|doctor|physician|patient|phone|email|address|time)"
                r"(?:[ _-][a-z]+){0,2})\s*\]", 0, _GAP),  # [REDACTED], [Patient Name]
    ("markers", r"\*\*(?:[A-Z][A-Z-]+\[[^\]\n]*\]|(?:ID-NUM|INSTITUTION|PLACE|NAME|DATE|AGE|PHONE|STREET-ADDRESS|"
                r"ZIP-CODE|EMAIL|ACCESSION-NUM|PATH-NUM)\b(?!\*))", 0, _GAP),  # Pitt De-ID: **NAME[AAA], **ID-NUM
    ("markers", r"_{3,}|(?<![A-Za-z0-9_])__(?![A-Za-z0-9_])", 0, _GAP),  # MIMIC-CXR: ___ (not sub__a.png)
    ("markers", r"\bX{3,}\b", 0, _GAP),  # IU X-ray / OpenI: XXXX
    ("urls", r"\b(?:https?://|ftp://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]", re.I, _GAP),
    ("emails", r"(?:mailto:)?\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\b", 0, _GAP),
    ("phones", r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]?\d{4}(?!\w)", 0, _GAP),
    ("phones", r"(?<![\w+])\+\d{1,3}(?:[\s.-]\d{2,5}){2,4}(?!\w)", 0, _GAP),
    ("phones", r"(?i:\b(?:tel|phone|pager|pgr|beeper|fax|ext|extension)\b\.?)\s*(?:#|:|no\.?)?\s*"
               r"\+?\d[\d\s().-]{2,}\d(?!\w)", 0, _GAP),
    ("dates", rf"\b{_YEAR}(?P<sep>[-/.])(?:0?[1-9]|1[0-2])(?P=sep)(?:0?[1-9]|[12]\d|3[01])"
              rf"(?:[T\s]{_CLOCK}(?:Z|[+-]\d{{2}}:?\d{{2}})?)?\b", 0, _WHEN),  # 2021-03-04[T10:30:00Z]
    ("dates", r"\b(?P<a>\d{1,2})(?P<sep>[/.-])(?P<b>\d{1,2})(?P=sep)(?P<y>(?:19|20)\d{2}|\d{2})\b(?![.-]\d)",
     0, _dmy),  # 03/04/2021, 4.3.2021, 03-04-21
    ("dates", rf"\b{_DAY}(?:\s+|-)(?:of\s+)?{_IMONTH}\.?,?(?:\s+|-){_YEAR}\b", 0, _WHEN),  # 4 March 2021
    ("dates", rf"\b{_IMONTH}\.?\s+{_DAY},?\s+{_YEAR}\b", 0, _WHEN),  # Mar 4, 2021
    ("dates", rf"\b{_IMONTH}\.?,?\s+{_YEAR}\b", 0, _WHEN),  # March 2021
    ("dates", rf"\b{_DAY}\s+(?:of\s+)?{_MONTH}\b\.?", 0, _WHEN),  # 4 March (capitalised month: "4 may" stays)
    ("dates", rf"\b{_MONTH}\.?\s+{_DAY}\b(?!\s*(?:{_UNITS}|[.,]\d))", 0, _WHEN),  # March 4
    ("dates", r"\b(?:0?[1-9]|1[0-2])/(?:19|20)\d{2}\b", 0, _WHEN),  # 03/2021
    ("dates", r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b", 0, _WHEN),  # DICOM 20210304
    ("dates", rf"\b{_CLOCK}\s?(?i:[ap]\.m\.|[ap]m\b)", 0, _WHEN),  # 9:15 pm (the dot after "pm." ends the sentence)
    ("dates", r"\b(?:1[0-2]|0?[1-9])\s?(?i:a\.m\.|p\.m\.|am\b|pm\b)", 0, _WHEN),  # 9 am
    ("dates", r"\b(?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d)?\b", 0, _WHEN),  # 10:30 (one-digit hours: ratios, 1:10)
    ("dates", r"(?<=\bat )\d:[0-5]\d\b", re.I, _WHEN),  # at 9:30
    ("dates", r"\b(?:[01]\d|2[0-3])[0-5]\d\s?(?:h|hrs|hours)\b", 0, _WHEN),  # 1430 hours
    ("ages", rf"\b(?P<n>{_AGE})(?!\+)(?:\s*-?\s*)(?:years?|yrs?|y)(?:\s*-?\s*)old\b", re.I, _age),  # 92-year-old
    ("ages", rf"\b(?P<n>{_AGE})(?!\+)\s*-?\s*(?:yo|y/o|y\.o\.?)(?!\w)", re.I, _age),  # 95 yo
    ("ages", rf"\b(?:aged?:?|age\s+of)\s+(?P<n>{_AGE})\b(?!\+)", re.I, _age),  # aged 91
    ("ages", rf"\b(?P<n>{_AGE})(?!\+)\s+(?:years?|yrs?)\s+of\s+age\b", re.I, _age),  # 93 years of age
    ("ids", rf"{_ID_LABEL}\s*[:#]?\s*(?=[\w-]*\d)[A-Za-z0-9][\w-]*", 0, _GAP),  # MRN: 1234567, Acc# A12345
    ("ids", r"\b\d{3}-\d{2}-\d{4}\b", 0, _GAP),  # 123-45-6789
    ("ids", rf"\b[A-Z]{{1,3}}-?\d{{5,}}\b", 0, _GAP),  # AB1234567
    ("ids", rf"(?<![\w.,])\d{{5,}}(?![\w]|[.,]\d)(?!\s*{_UNITS})", 0, _GAP),  # 1234567 (not 12345 mm)
    ("names", rf"{_TITLE}\s+{_NAME}", 0, _GAP),  # Dr. John Smith
    ("names", rf"(?i:\b(?:patient(?:'s)?\s+name|name|referring\s+(?:physician|doctor)|radiologist|attending)\s*:)"
              rf"\s*{_NAME}", 0, _GAP),  # Name: Jane Doe
    ("names", rf"(?i:\b(?:electronically\s+)?(?:dictated|signed|transcribed|reported|read)\s+by:?)\s+{_NAME}", 0,
     _GAP),  # Dictated by J Smith
)]

# What a removal leaves dangling, taken with it (not counted again): the title or label of a removed name
# or number, the unit of a removed age, a "#".
_DANGLING = [re.compile(p) for p in (
    rf"{_TITLE}\s*(?={_ANY})",
    rf"{_ID_LABEL}\s*[:#]?\s*(?={_ANY})",
    rf"(?i:\b(?:DOB|D\.O\.B\.|date\s+of\s+birth|(?:exam|study|report|scan|admission|discharge)\s+date|date|time)"
    rf"\s*:)\s*(?={_ANY})",
    rf"(?i:\b(?:patient(?:'s)?\s+name|name|referring\s+(?:physician|doctor)|radiologist|attending)\s*:)\s*(?={_ANY})",
    rf"(?i:\b(?:electronically\s+)?(?:dictated|signed|transcribed|reported|read)\s+by:?)\s*(?={_ANY})",
    rf"#\s*(?={_ANY})",
)] + [re.compile(rf"(?<={_ANY})(?:\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b|\s*-?\s*(?:yo|y/o|y\.o\.?)(?!\w))", re.I)]
_MERGE = re.compile(rf"(?P<first>{_ANY})(?:[^\S\n]*[,;]?[^\S\n]*{_ANY})+")  # "___, ___" is one gap
# A preposition always goes with the date or time it introduced ("seen on 03/04/2021" -> "seen").
_WHEN_LEAD = re.compile(rf"\b(?i:(?:as[^\S\n]+of|on|at|dated|since|until|till|from|of|in|by|to)[^\S\n]+(?:the[^\S\n]+)?"
                        rf"|the[^\S\n]+)(?={_WHEN})")
# Any other removal takes its preposition only when nothing follows it that could be its object.
_FUNCTION = ("by|at|on|in|to|from|with|for|of|and|or|via|per|was|were|is|are|has|have|had|who|which|"
             "regarding|about|after|before|during|today|yesterday|tonight|earlier|previously")
_GAP_LEAD = re.compile(rf"\b(?i:with|by|to|from|per|of|at|on|for|in|via|and|or)[^\S\n]+{_ANY}"
                       rf"(?=[^\S\n]*(?:$|\n|[.,;:!?)\]]|(?i:{_FUNCTION})\b|{_ANY}))")
_ARTICLE = re.compile(rf"\b(?P<art>[Aa])n?(?P<gap>[^\S\n]+{_ANY}[^\S\n]*)(?=(?P<word>[A-Za-z][\w-]*))")
_JOIN = re.compile(rf"[^\S\n]*(?P<lp>[,;:(]?)[^\S\n]*{_ANY}(?P<rp>(?:[^\S\n]*[,;:.!?)])*)[^\S\n]*")
_CAPITALISE = re.compile(f"{_CAP}([^\\S\\n]*)([a-z])")


def _an(word: str) -> bool:
    """Whether the indefinite article before ``word`` is "an": vowels by letter, acronyms by sound (an MRI)."""
    if len(word) > 1 and word.isupper():
        return word[0] in "AEFHILMNORSX"
    w = word.lower()
    return w[0] in "aeiou" and not w.startswith(("uni", "use", "usu", "ure", "uro", "one", "eu"))


def _article(m: re.Match) -> str:
    art = m["art"] + ("n" if _an(m["word"]) else "")
    return art + m["gap"]


def _join(m: re.Match) -> str:
    """The text that closes one removed span, given the punctuation on either side of it."""
    before, after = m.string[:m.start()], m.string[m.end():]
    lp, rp = m["lp"], re.sub(r"\s", "", m["rp"])
    if lp == "(" and rp.startswith(")"):  # "(MRN 1234567)": the parentheses go too
        lp, rp = "", rp[1:]
    opens = not before or before[-1] in ".!?\n"  # the removed span began a sentence
    ends = not after or after[0] == "\n"
    sep = " " if before and not ends and before[-1] != "\n" else ""
    if opens:
        closers = rp.lstrip(",;:.!?")
        return closers + sep + _CAP if not ends else closers
    if lp == "(":
        return " (" if before else "("
    terminal = rp.lstrip(",;:")
    if terminal:
        return terminal + ("" if ends else " ")
    soft = lp or rp[:1]
    if ends:
        return ""
    return (soft + " ") if soft else " "


def _tidy(text: str) -> str:
    """Close the removed spans: merge neighbours, take dangling prepositions and articles along, join the
    punctuation on either side. Text away from a removal is not touched."""
    text = _MERGE.sub(lambda m: m["first"], text)
    while True:  # "with ___ by ___ at 10:30": each removal can leave the preposition before it dangling
        new = _MERGE.sub(lambda m: m["first"], _GAP_LEAD.sub(lambda m: m.group(0)[-1], _WHEN_LEAD.sub("", text)))
        if new == text:
            break
        text = new
    text = _ARTICLE.sub(_article, text)
    text = _JOIN.sub(_join, text)
    text = _CAPITALISE.sub(lambda m: m[1] + m[2].upper(), text)
    return text.replace(_CAP, "")


def scrub(text: str) -> tuple[str, Counter]:
    """``text`` with the identifiers, dates and markers of the module's table removed (ages over 89 become
    90+), and how many of each category it changed. Text with none comes back unchanged."""
    counts: Counter = Counter()
    out = text.translate({ord(c): None for c in _MARKS + _CAP})
    for _ in range(4):  # to a fixed point: a removal can bring two pieces together that form another identifier
        out, found = _scrub_once(out)
        if not found:
            break
        counts += found
    return (out, counts) if counts else (text, counts)


def _scrub_once(text: str) -> tuple[str, Counter]:
    counts: Counter = Counter()
    out = text
    for category, pattern, repl in _RULES:
        def sub(m: re.Match, category=category, repl=repl) -> str:
            new = repl(m) if callable(repl) else repl
            if new is None:
                return m.group(0)
            counts[category] += 1
            return new
        out = pattern.sub(sub, out)
    if not counts:
        return text, counts
    for pattern in _DANGLING:
        out = pattern.sub("", out)
    return _tidy(out), counts


def scrub_figures(before: list[str], after: list[str], counts: Counter) -> dict[str, int]:
    """The metrics of one scrub (ingest's and paraphrase's alike): the captions it changed, the removals in all and
    per category."""
    return {"scrubbed_captions": sum(a != b for a, b in zip(before, after)), "scrubbed_total": sum(counts.values()),
            **{f"scrubbed_{c}": counts.get(c, 0) for c in CATEGORIES}}


def scrub_captions(captions: list[str]) -> tuple[list[str], Counter]:
    """Each caption scrubbed (see ``scrub``), in order, and the changes per category summed over the list:
    a caption that occurs three times counts three times. Repeated captions are scrubbed once."""
    done: dict[str, tuple[str, Counter]] = {}
    total: Counter = Counter()
    out = []
    for caption in captions:
        if caption not in done:
            done[caption] = scrub(caption)
        text, counts = done[caption]
        out.append(text)
        total.update(counts)
    return out, total
