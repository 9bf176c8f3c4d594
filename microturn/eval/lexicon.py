"""Words for the training split's targets and cue words: many real words and invented ones.

A model that has seen a dozen target words learns those words, not to repeat the one it was
asked for; with hundreds, some of them never seen anywhere (`invented_words`), saying the
requested word can only be learned as copying it. Only the train book draws from here, minus
every word of the held-out book (`phrasebook.py`).
"""

import numpy as np

_COMMON = """
    acorn anchor angel ant arrow autumn avocado badge bakery balloon bamboo bandit barrel
    basket beacon beetle berry bicycle biscuit blossom boat bottle bracelet branch bread brick
    broom bubble bucket buffalo butter button cabin cactus camel camera canoe canyon captain
    carpet carrot cedar cereal chalk cherry chimney circus cloud clover coconut comet compass
    copper cotton crayon cricket crystal cupboard curtain daisy desert diamond dinner dragon
    drum eagle engine feather fern festival finger flame flute forest fossil fountain fox frog
    galaxy giant ginger glacier glove goat golden grape gravel guitar hammer harbour hazel
    helmet honey horizon husky igloo island ivory jacket jaguar jelly jungle kettle kite koala
    ladder lagoon lamp lava leopard letter lizard lobster magnet mango maple meadow melon
    mirror mitten monkey moose mountain muffin mushroom napkin needle nest noodle oasis ocean
    olive onion otter owl paddle panda parrot peach peanut pebble pepper pillow pirate plum
    pocket pony potato pumpkin puzzle quilt rabbit radio rainbow raven ribbon robot saddle
    salmon sandal saturn scarf shadow shell signal sketch sky sled snail snowman sofa spider
    sponge squirrel stamp star statue sugar sunset swan sweater table tomato tractor trumpet
    tulip tunnel turtle umbrella valley velvet village volcano wagon walnut whale wheel willow
    wizard wolf yogurt zipper
"""
COMMON_WORDS = tuple(_COMMON.split())

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gl", "kr", "pl", "sk", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "l", "r", "m", "s", "k")


def invented_words(count: int, seed: int) -> tuple[str, ...]:
    """`count` distinct pronounceable non-words of two syllables ("brimol", "stazen")."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < count:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(2))
        if len(word) <= 7 and word not in out and word not in COMMON_WORDS:
            out.append(word)
    return tuple(out)
