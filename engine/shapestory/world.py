"""ShapeStory: the procedural world the default model knows. Seeded stories with ground truth.

For: `sample_story(seed, ...)` -> a `StorySpec` (world, characters, shots with captions and
actions), `track(spec, shot, height, width)` -> per-frame ground truth of every character on
screen (centre, radius, colour, shape), `to_story(spec)` (the engine's Story for it) and the
fixed vocabulary. Everything is a pure function of the seed: no files, no global RNG.
Not for: pixels (render.py) or scoring (score.py).

The memory rule: a character's look (size, colour, shape) is stated in the shot where it first
appears (and in some stories in the global caption too); in later shots it is often named without
its look ("Kip bounces"), so the look can only come from earlier frames.

Seeds: training draws seeds below HELDOUT_SEED_START; the quality benchmark uses seeds from it
up. Names: a pool of made-up names; every name whose `is_heldout_name` is true never appears in
training stories, so the benchmark checks that names the model never saw work.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

# ---- vocabulary (the quality benchmark and users rely on it; add words, never remove) -----------

COLOURS = {  # character colours, RGB
    "red": (220, 38, 38), "orange": (249, 133, 22), "yellow": (250, 221, 40), "green": (34, 160, 60),
    "blue": (37, 84, 220), "purple": (140, 55, 200), "pink": (246, 130, 196), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 11.0, "big": 19.0}  # radius in pixels at 128 px frame height, wide framing
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
WORLDS = {  # background colour, pattern colour (RGB) and the words for it
    "sky": ((150, 200, 240), (190, 222, 248), ("blue sky", "a clear sky", "the sky")),
    "grass": ((96, 150, 70), (120, 172, 92), ("green grass", "a grassy field", "the meadow")),
    "sand": ((214, 190, 140), (196, 170, 120), ("sand", "a sandy beach", "the desert")),
    "night": ((22, 26, 58), (46, 52, 96), ("the night", "a dark night sky", "night")),
    "snow": ((200, 210, 226), (178, 190, 210), ("snow", "a snowy field", "white snow")),
}
PATTERNS = ("none", "stripes", "dots")
ACTIONS = ("left", "right", "up", "down", "grows", "shrinks", "bounces", "still")
FRAMINGS = ("wide", "close")
CLOSE_UP_SCALE = 2.0  # close-up draws everything about twice as large

ACTION_WORDS = {
    "left": ("moves left", "slides to the left", "goes left", "drifts left", "heads left"),
    "right": ("moves right", "slides to the right", "goes right", "drifts right", "heads right"),
    "up": ("moves up", "rises", "floats up", "climbs upward", "goes up"),
    "down": ("moves down", "sinks", "drops down", "falls slowly", "goes down"),
    "grows": ("grows", "gets bigger", "swells up", "grows larger"),
    "shrinks": ("shrinks", "gets smaller", "shrinks down", "becomes smaller"),
    "bounces": ("bounces", "hops up and down", "jumps up and down", "bounces in place"),
    "still": ("stays still", "rests", "sits still", "waits", "does not move"),
}
FRAMING_WORDS = {"wide": ("Wide shot:", "Wide view:", "From afar:", ""), "close": ("Close-up:", "Close up:", "Up close:")}
PATTERN_WORDS = {"none": ("",), "stripes": (" with stripes", ", striped", " with stripes across it"),
                 "dots": (" with dots", ", dotted", " covered in dots")}

HELDOUT_SEED_START = 1_000_000_000  # training seeds are below, benchmark seeds at or above
MAX_CHARACTERS = 3

_SYLLABLES = ("ka", "ki", "ko", "ta", "ti", "to", "mo", "mi", "na", "ni", "lu", "lo", "ra", "ri", "ze",
              "zo", "pa", "pi", "bo", "be", "su", "sa", "fe", "fi", "go", "ga", "vu", "ve", "du", "da", "jo", "ju")
_CODAS = ("", "", "n", "k", "x", "l", "m", "p", "s")


def _make_names() -> tuple[str, ...]:
    names = []
    for a in _SYLLABLES:
        for b in _SYLLABLES:
            for coda in _CODAS[:4]:
                names.append((a + b + coda).capitalize())
        for coda in _CODAS[3:]:
            names.append((a + coda).capitalize())
    return tuple(dict.fromkeys(n for n in names if len(n) >= 3))


NAMES = _make_names()  # the name pool (about 4,000 made-up names)


def is_heldout_name(name: str) -> bool:
    """One name in eight (by a fixed hash) is never used in training."""
    return zlib.crc32(name.lower().encode()) % 8 == 0


TRAIN_NAMES = tuple(n for n in NAMES if not is_heldout_name(n))
HELDOUT_NAMES = tuple(n for n in NAMES if is_heldout_name(n))


@dataclass(frozen=True)
class Character:
    name: str
    colour: str  # a COLOURS key
    shape: str  # a SHAPES entry
    size: str  # a SIZES key

    def look(self, rng: random.Random | None = None) -> str:
        size = self.size if rng is None else rng.choice(SIZE_WORDS[self.size])
        return f"{size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Appearance:
    character: int  # index into StorySpec.characters
    action: str  # an ACTIONS entry
    x: float  # start centre, fraction of the frame width
    y: float  # start centre, fraction of the frame height
    described: bool  # the caption states the look (size, colour, shape)


@dataclass(frozen=True)
class ShotSpec:
    caption: str
    framing: str  # "wide" | "close"
    appearances: tuple[Appearance, ...]


@dataclass(frozen=True)
class StorySpec:
    seed: int
    world: str  # a WORLDS key
    pattern: str  # a PATTERNS entry
    global_caption: str
    characters: tuple[Character, ...]
    shots: tuple[ShotSpec, ...]
    frames: int  # frames per shot

    def first_shot(self, character: int) -> int:
        """The shot where `character` first appears."""
        return next(s for s, shot in enumerate(self.shots) if any(a.character == character for a in shot.appearances))


def _caption_for(rng: random.Random, chars: tuple[Character, ...], apps: list[Appearance], framing: str) -> str:
    clauses = []
    for a in apps:
        c = chars[a.character]
        verb = rng.choice(ACTION_WORDS[a.action])
        if not a.described:
            clauses.append(f"{c.name} {verb}")
            continue
        form = rng.randrange(3)
        if form == 0:
            clauses.append(f"{c.name}, a {c.look(rng)}, {verb}")
        elif form == 1:
            clauses.append(f"a {c.look(rng)} called {c.name} {verb}")
        else:
            clauses.append(f"{c.name} the {c.look(rng)} {verb}")
    if len(clauses) == 1:
        body = clauses[0]
    else:
        joiner = rng.choice((" and ", " while ", "; "))
        body = ", ".join(clauses[:-1]) + joiner + clauses[-1] if len(clauses) > 2 else joiner.join(clauses)
    body = body[0].upper() + body[1:] + "."
    prefix = rng.choice(FRAMING_WORDS[framing])
    if framing == "close" and rng.random() < 0.3:
        return body[:-1] + ", seen up close."
    return f"{prefix} {body}".strip()


def _placement(rng: random.Random, n: int, slot: int, action: str, half_w: float,
               half_h: float) -> tuple[float, float] | None:
    """Start centre (fractions of width, height) so the whole motion stays inside the frame and
    characters of one shot keep to their own columns; half_w, half_h: the shape's true half
    extent (fractions). None when no such centre exists (the caller frames wider or keeps still)."""
    lo, hi = slot / n, (slot + 1) / n
    travel_x = MOVE_X / n if action in ("left", "right") else 0.0
    x_lo, x_hi = lo + half_w, hi - half_w
    if action == "left":
        x_lo += travel_x
    elif action == "right":
        x_hi -= travel_x
    y_lo, y_hi = half_h, 1 - half_h
    if action == "up":
        y_lo += MOVE_Y
    elif action == "down":
        y_hi -= MOVE_Y
    elif action == "bounces":
        y_lo += BOUNCE_Y
    if x_hi < x_lo or y_hi < y_lo:
        return None
    return rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)


MOVE_X = 0.5  # a move left/right travels half the frame width (divided among the shot's columns)
MOVE_Y = 0.35  # a move up/down travels this fraction of the frame height
BOUNCE_Y = 0.22  # bounce height, fraction of the frame height
GROW, SHRINK = 1.6, 0.55  # radius factor reached at the end of the shot
ASPECT = 1.5  # width / height of the frames the positions are planned for (192 x 128)
EXTENT = {"circle": 1.0, "square": 0.88, "triangle": 1.3, "diamond": 1.25}  # half extent / radius (render.py)
EDGE = 1.5 / 128  # antialiased edge and a pixel of air, fraction of the frame height


def _place_all(rng: random.Random, chars: tuple[Character, ...], order: list[int], actions: list[str],
               framing: str) -> list[tuple[float, float]] | None:
    """Start centres for the shot's characters (left-to-right columns), or None if one has no room."""
    scale = CLOSE_UP_SCALE if framing == "close" else 1.0
    spots = []
    for slot, (c, action) in enumerate(zip(order, actions)):
        r = SIZES[chars[c].size] * scale / 128.0 * (GROW if action == "grows" else 1.0)
        half = r * EXTENT[chars[c].shape] + EDGE
        spot = _placement(rng, len(order), slot, action, half / ASPECT, half)
        if spot is None:
            return None
        spots.append(spot)
    return spots


def sample_story(seed: int, num_shots: int | None = None, frames: int = 8, names: str = "train",
                 num_characters: int | None = None, close_up: float = 0.3) -> StorySpec:
    """A story drawn from `seed` alone. num_shots 1..8 (None: drawn), frames per shot,
    names: "train" | "heldout" | "any" (which part of the name pool to draw from), close_up: the
    chance that a shot of at most two characters is framed close (the same draws for any value,
    so a story changes only in its framings)."""
    if names not in ("train", "heldout", "any"):
        raise ValueError(f"names must be 'train', 'heldout' or 'any', got {names!r}")
    rng = random.Random(seed)
    S = num_shots if num_shots is not None else rng.randint(1, 8)
    if not 1 <= S <= 8:
        raise ValueError(f"num_shots must be in [1, 8], got {S}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not 0.0 <= close_up <= 1.0:
        raise ValueError(f"close_up must be a chance in [0, 1], got {close_up}")
    pool = {"train": TRAIN_NAMES, "heldout": HELDOUT_NAMES, "any": NAMES}[names]
    n_chars = num_characters if num_characters is not None else rng.choice((1, 2, 2, 3, 3))
    n_chars = max(1, min(n_chars, MAX_CHARACTERS, S + 2))
    colours = rng.sample(list(COLOURS), n_chars)  # distinct colours: a colour names a character
    chars = tuple(Character(name=n, colour=c, shape=rng.choice(SHAPES), size=rng.choice(list(SIZES)))
                  for n, c in zip(rng.sample(pool, n_chars), colours))
    world, pattern = rng.choice(list(WORLDS)), rng.choice(PATTERNS)
    looks_in_global = rng.random() < 0.3

    # who is in which shot: every character enters once, in order; later shots revisit
    entry = sorted(rng.sample(range(S), min(n_chars, S))) + [S - 1] * max(0, n_chars - S)
    entry = sorted(entry)
    entry[0] = 0
    shots = []
    for s in range(S):
        introduced = [c for c in range(n_chars) if entry[c] < s]
        new = [c for c in range(n_chars) if entry[c] == s]
        revisit = [c for c in introduced if rng.random() < 0.5]
        if not new and not revisit:
            revisit = [rng.choice(introduced)]
        present = sorted(new + revisit)[:MAX_CHARACTERS]
        framing = "close" if len(present) <= 2 and rng.random() < close_up else "wide"
        order = rng.sample(present, len(present))  # left-to-right columns
        actions = [rng.choice(ACTIONS) for _ in order]
        spots = _place_all(rng, chars, order, actions, framing)
        if spots is None and framing == "close":  # too large to move like that up close: frame wide
            framing = "wide"
            spots = _place_all(rng, chars, order, actions, framing)
        while spots is None:  # still no room: the largest mover keeps still instead
            movers = [i for i, a in enumerate(actions) if a != "still"]
            i = max(movers, key=lambda i: (SIZES[chars[order[i]].size], -i))
            actions[i] = "still"
            spots = _place_all(rng, chars, order, actions, framing)
        apps = [Appearance(c, action, round(x, 4), round(y, 4), c in new or rng.random() < 0.3)
                for c, action, (x, y) in zip(order, actions, spots)]
        caption_order = sorted(apps, key=lambda a: (not a.described, rng.random()))
        shots.append(ShotSpec(_caption_for(rng, chars, caption_order, framing), framing, tuple(apps)))

    world_words = rng.choice(WORLDS[world][2])
    place = f"{world_words}{rng.choice(PATTERN_WORDS[pattern])}"
    glob = rng.choice((f"A story on {place}.", f"The world is {place}.", f"Somewhere on {place}.",
                       f"Shapes on {place}."))
    if looks_in_global:
        glob += " " + " ".join(f"{c.name} is a {c.look(rng)}." for c in chars)
    return StorySpec(seed=seed, world=world, pattern=pattern, global_caption=glob, characters=chars,
                     shots=tuple(shots), frames=frames)


# ---- ground truth ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placed:
    character: int
    cx: float  # centre, pixels
    cy: float
    radius: float  # pixels
    colour: str
    shape: str


def track(spec: StorySpec, shot: int, height: int = 128, width: int = 192) -> list[list[Placed]]:
    """Ground truth of shot `shot`: for each frame, every character on screen (drawing order)."""
    sh = spec.shots[shot]
    scale = (CLOSE_UP_SCALE if sh.framing == "close" else 1.0) * height / 128.0
    n = len(sh.appearances)
    F = spec.frames
    out = []
    for f in range(F):
        u = f / max(F - 1, 1)  # 0 -> 1 over the shot
        placed = []
        for a in sh.appearances:
            c = spec.characters[a.character]
            r = SIZES[c.size] * scale
            x, y = a.x * width, a.y * height
            if a.action == "left":
                x -= u * MOVE_X / n * width
            elif a.action == "right":
                x += u * MOVE_X / n * width
            elif a.action == "up":
                y -= u * MOVE_Y * height
            elif a.action == "down":
                y += u * MOVE_Y * height
            elif a.action == "grows":
                r *= 1 + u * (GROW - 1)
            elif a.action == "shrinks":
                r *= 1 + u * (SHRINK - 1)
            elif a.action == "bounces":
                y -= math.sin(math.pi * u) * BOUNCE_Y * height  # one hop over the shot
            placed.append(Placed(a.character, x, y, r, c.colour, c.shape))
        out.append(placed)
    return out


def to_story(spec: StorySpec, **settings):
    """The engine's Story for this spec (shots of spec.frames latent frames, seeds from the spec's
    seed). Keyword arguments override GenerationSettings fields."""
    from engine.story import GenerationSettings, Shot, Story
    shots = [Shot(caption=s.caption, frames=spec.frames, seed=(spec.seed * 16 + i) % (2**32 - 1))
             for i, s in enumerate(spec.shots)]
    return Story(spec.global_caption, shots, GenerationSettings(**settings)).validate()


__all__ = ["vocabulary_captions", "COLOURS", "SHAPES", "SIZES", "WORLDS", "PATTERNS", "ACTIONS", "FRAMINGS", "NAMES", "TRAIN_NAMES",
           "HELDOUT_NAMES", "HELDOUT_SEED_START", "Character", "Appearance", "ShotSpec", "StorySpec", "Placed",
           "sample_story", "track", "to_story", "is_heldout_name"]


def vocabulary_captions(stories: int = 4000) -> list[str]:
    """Every word the generator can write, as short captions (names, looks, worlds, actions,
    framings, patterns), plus the captions of `stories` sampled train and held-out stories: what a
    text encoder pruned to ShapeStory's vocabulary must keep."""
    words = [*NAMES, *COLOURS, *SHAPES, *(w for ws in SIZE_WORDS.values() for w in ws),
             *(w for _, _, ws in WORLDS.values() for w in ws), *(w for ws in ACTION_WORDS.values() for w in ws),
             *(w for ws in FRAMING_WORDS.values() for w in ws if w), *(w for ws in PATTERN_WORDS.values() for w in ws if w)]
    out = list(words)
    for seed in range(stories):
        for names, base in (("train", 0), ("heldout", HELDOUT_SEED_START)):
            spec = sample_story(base + seed, names=names)
            out.append(spec.global_caption)
            out.extend(s.caption for s in spec.shots)
    return out
