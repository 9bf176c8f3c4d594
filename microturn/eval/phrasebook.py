"""Phrasings, cue words and facts of the scenario families, in two disjoint books.

`train` feeds data generation (the training issue); `heldout` is the benchmark's. No template,
cue word, target word or backchannel is in both (`tests/test_eval.py` checks it), so a score on
`heldout` says how a behaviour generalises, not how well a list was memorised. Facts (capitals,
colours of things, yes/no) are split by item too.
"""

from dataclasses import dataclass

from microturn.eval.lexicon import COMMON_WORDS, invented_words


@dataclass(frozen=True)
class Book:
    # pause: an unfinished start, a filler, then the rest of the sentence
    openers: tuple[str, ...]
    fillers: tuple[str, ...]
    topics: tuple[str, ...]
    # turn-taking: complete requests (a question mark or a full stop ends them)
    requests: tuple[str, ...]
    # interruption and backchannel: what the model is in the middle of saying
    monologues: tuple[str, ...]
    interruptions: tuple[str, ...]
    backchannels: tuple[str, ...]
    # time: {word} {n}; count: {n} {m}
    timed: tuple[str, ...]
    when_passed: tuple[str, ...]  # say anything when {n} seconds have passed
    counting: tuple[str, ...]
    # of the timed requests, how many are counts (training asks more: a count is many timed
    # words in a row, each needing the last one's number, the skill the model learns slowest)
    counting_share: float
    targets: tuple[str, ...]  # words the model is asked to say
    # cues: {cue} {word}
    text_cues: tuple[str, ...]
    cue_words: tuple[str, ...]
    chatter: tuple[str, ...]  # what the user says around a cue word
    audio_cues: tuple[str, ...]  # {sound} {word}
    sound_names: tuple[tuple[str, str], ...]  # (name in the instruction, Sound.kind)
    voices: tuple[str, ...]  # espeak-ng voices (accent + variant) of voiced sessions
    # what the numbers are drawn from: a sound's onset after the instruction, a timed wait
    # (training draws wider than the eval, so that no onset or wait is a safe guess)
    sound_onset_ms: tuple[int, int]
    wait_s: tuple[int, int]
    visual_colour_cues: tuple[str, ...]  # {colour} {word}
    visual_shape_cues: tuple[str, ...]  # {shape} {word}
    colours: tuple[tuple[str, tuple[int, int, int]], ...]
    shapes: tuple[str, ...]
    # content: questions with checkable answers
    capital_questions: tuple[str, ...]  # {country}
    capitals: tuple[tuple[str, str], ...]
    sum_questions: tuple[str, ...]  # {a} {b}
    colour_questions: tuple[str, ...]  # {thing}
    thing_colours: tuple[tuple[str, str], ...]
    yes_no: tuple[tuple[str, str], ...]
    # background: arithmetic too hard to do in one's head ({a} {op} {b}), and what the user
    # says while the answer is being worked out
    hard_sums: tuple[str, ...]
    operations: tuple[tuple[str, str], ...]  # (how it is said, "+" | "-" | "*")
    asides: tuple[str, ...]


HELDOUT = Book(
    openers=("I am curious about", "Tell me, I would like to hear about",
             "There is something I keep asking myself, namely", "Do you know anything about",
             "I would really love to learn", "Help me think through"),
    fillers=("er", "you know", "I mean", "so"),
    topics=("how volcanoes form under the sea", "why onions make people cry",
            "what the best time is to visit the mountains", "how bees find their way home",
            "the reason clocks run clockwise", "how to keep basil alive indoors",
            "why the ocean tastes salty", "how long a candle can burn"),
    requests=("Could you recommend a film for tonight?", "What is a quick lunch I can make?",
              "Give me one tip for sleeping better.", "Where do penguins live?",
              "Which fruit has the most vitamin C?", "Name an instrument that is easy to learn.",
              "How do plants drink water?", "Describe a rainbow in a few words."),
    monologues=("Let me explain how a bicycle works: the pedals turn a chain, the chain turns "
                "the back wheel, and the gears change how hard you have to push",
                "The city museum opens at nine and has a large hall of old maps, a room of "
                "paintings from the coast and a small garden with a cafe",
                "A good morning routine might begin with a glass of water, a short walk, and a "
                "few minutes of quiet before you look at your phone"),
    interruptions=("Excuse me, one moment.", "Okay, let me stop you there.",
                   "Sorry to cut in, but quick question.", "No no, listen."),
    backchannels=("mhm", "yep", "I see", "okay"),
    timed=("After {n} seconds, tell me {word}.", "Give it {n} seconds, then say {word}.",
           "Once {n} seconds go by, say {word}."),
    when_passed=("Tell me when {n} seconds have passed.",),
    counting=("Count every {n} seconds up to {m}.",),
    counting_share=0.2,
    targets=("orange", "goodbye", "castle", "dolphin", "thunder", "pencil", "summer", "violin",
             "marble", "lantern"),
    text_cues=("As soon as I say {cue}, answer {word}.", "The moment I say {cue}, say {word}.",
               "Whenever the word {cue} comes up, say {word}."),
    cue_words=("pineapple", "tuesday", "zebra", "blanket", "rocket", "piano", "lemon",
               "bridge"),
    chatter=("so yesterday I was at the station waiting for the",
             "you would not believe what happened to my old",
             "I think next week we should visit the",
             "the neighbours kept talking about their"),
    audio_cues=("Say {word} the moment you hear a {sound}.",
                "As soon as a {sound} plays, say {word}."),
    sound_names=(("tone", "beep"), ("chime", "chime"), ("bell", "chime")),
    voices=("en-gb-x-rp+f3", "en-us-nyc+m5", "en-gb-x-gbclan+f4", "en-gb-x-rp+m1"),
    sound_onset_ms=(1500, 6001),
    wait_s=(2, 16),
    visual_colour_cues=("Say {word} once the picture becomes {colour}.",
                        "The moment everything turns {colour}, say {word}."),
    visual_shape_cues=("Say {word} as soon as a {shape} shows up.",),
    colours=(("white", (245, 245, 245)), ("purple", (140, 40, 180)),
             ("orange", (250, 140, 20))),
    shapes=("triangle",),
    capital_questions=("Tell me the capital city of {country}.",
                       "What's the name of the capital of {country}?"),
    capitals=(("England", "London"), ("Austria", "Vienna"), ("Portugal", "Lisbon"),
              ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
              ("Poland", "Warsaw"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
              ("Thailand", "Bangkok")),
    sum_questions=("How much is {a} and {b} together?", "Add {a} to {b}, what do you get?"),
    colour_questions=("Which colour is {thing}?", "Tell me the colour of {thing}."),
    thing_colours=(("a ripe tomato", "red"), ("milk", "white"), ("a lemon", "yellow"),
                   ("a crow", "black"), ("a summer leaf", "green")),
    yes_no=(("Is water wet?", "yes"), ("Do dogs have four legs?", "yes"),
            ("Can a car fly by itself?", "no"), ("Is fire cold?", "no")),
    hard_sums=("Tell me what {a} {op} {b} comes to.", "What's {a} {op} {b}?",
               "Could you figure out {a} {op} {b} for me?", "I wonder what {a} {op} {b} is."),
    operations=(("multiplied by", "*"), ("added to", "+"), ("take away", "-")),
    asides=("Meanwhile I am going to put the kettle on and find some biscuits.",
            "Oh and by the way, the neighbours are painting their fence green today.",
            "While you do that I will look for my reading glasses somewhere here."),
)



def _train_words(words: tuple[str, ...]) -> tuple[str, ...]:
    """`words` without repeats and without any target or cue word of the held-out book."""
    held = set(HELDOUT.targets) | set(HELDOUT.cue_words)
    return tuple(dict.fromkeys(w for w in words if w not in held))


TRAIN = Book(
    openers=("So what I really want to know is", "I was wondering", "Could you tell me",
             "My question is about", "The thing I keep thinking about is", "I need to figure out",
             "Let me ask you about", "What bothers me is", "I have been trying to understand",
             "Can you help me with"),
    fillers=("um", "uh", "well", "like", "hmm"),
    topics=("how long it takes to boil an egg", "why the sky looks blue in the day",
            "the best way to learn to swim", "what to cook for dinner tonight",
            "how trains stay on their tracks", "why cats like to sleep so much",
            "where the nearest library is", "how to plant tomatoes in spring",
            "what makes bread rise in the oven", "how far away the moon is",
            "why leaves change colour in autumn", "how to fix a flat bicycle tyre"),
    requests=("What time does the sun usually set in summer?",
              "Can you tell me a fun fact about owls?", "How do I make a cup of tea?",
              "Please give me a name for my new dog.", "What should I read next?",
              "Tell me something nice about the ocean.", "Why do birds sing in the morning?",
              "How many legs does a spider have?", "Suggest a game we can play outside.",
              "What is a good way to relax after work?", "Tell me a joke about cats.",
              "Give me an idea for a birthday present.", "Name three animals that live in "
              "the desert.", "Explain what a rainbow is made of.", "List two things I need "
              "for a picnic.", "Recommend a song for a rainy day.", "Share a tip for "
              "staying focused.", "Describe the taste of a strawberry.", "Think of a name "
              "for a boat.", "Give me a word that rhymes with cat.", "Who invented the "
              "telephone?", "When do leaves fall from the trees?", "Where does rain come "
              "from?", "Which animal is the fastest on land?", "Is it healthy to drink "
              "coffee?", "Could you suggest a hobby for the winter?", "Would you explain "
              "how a magnet works?", "Help me pick a colour for my kitchen.", "Tell me how "
              "to say thank you in Spanish.", "Say something to cheer me up."),
    monologues=("Sure, let me tell you about the history of bread, which goes back "
                "thousands of years to the first farmers who ground grain between stones",
                "The weather tomorrow looks mild in the morning with some clouds moving in "
                "from the west and a chance of light rain by the evening",
                "Here is a recipe for pancakes: mix two cups of flour with a spoon of sugar, "
                "add milk and eggs, and whisk it all until smooth",
                "Octopuses are remarkable animals with three hearts, blue blood and arms that "
                "can taste what they touch while they explore the sea floor",
                "To learn a new language, start with the words you use every day, listen to "
                "native speakers and practise a little bit each morning",
                # more topics, and full stops inside: a sentence's end is not the turn's
                "Volcanoes form where melted rock rises through cracks in the crust. Over "
                "many eruptions the lava and ash pile up into a mountain",
                "A good cup of tea needs fresh water, just off the boil. Let the leaves steep "
                "for three or four minutes, then take them out",
                "Bees visit thousands of flowers every day to collect nectar, which they carry "
                "back to the hive and slowly turn into honey",
                "The first trains ran on wooden rails pulled by horses. Steam engines came "
                "later and made travel across a whole country possible in a day",
                "If you want to grow tomatoes, give them a sunny spot and plenty of water. "
                "Tie the stems to a stick as they get taller",
                "Sleep matters more than most people think: the brain sorts the day's "
                "memories at night and the body repairs its muscles",
                "Chess starts with sixteen pieces on each side. The pawns move forward one "
                "square at a time, and the knight jumps in the shape of an L",
                "Lighthouses warned ships away from rocks long before radar. Each one flashes "
                "its own pattern so sailors can tell which coast they are near",
                "Our solar system has eight planets, from small rocky Mercury close to the "
                "sun out to the cold blue giant Neptune",
                "To fix a flat tyre, take the wheel off, find the hole in the tube and cover "
                "it with a patch. Then pump it up slowly",
                "Penguins cannot fly, but they swim fast, using their wings like flippers "
                "to chase fish under the ice",
                "The old town has narrow streets and a market square. On Saturdays farmers "
                "sell cheese, bread and fruit from their stalls",
                "Maps used to be drawn by hand from the notes of travellers, so many of the "
                "early ones had whole rivers in the wrong place",
                "Running a first marathon takes months of training. Most plans build up "
                "slowly, with one long run each week and easy days between",
                "Clouds are made of tiny drops of water or ice. When the drops grow heavy "
                "enough they fall as rain or snow",
                "A piano has eighty-eight keys, and each one moves a small hammer that "
                "strikes a string inside the case",
                "Our team meets every Monday to plan the week. We go through the open tasks "
                "and decide who takes which one",
                "Elephants remember places where they found water years ago, and the oldest "
                "female leads the herd back there in a dry season",
                "Paper was first made from plant fibres soaked in water and pressed flat. "
                "The sheets were dried in the sun before anyone wrote on them",
                "The recipe for soup is simple: soften an onion in butter, add chopped "
                "vegetables and stock, and let it cook for half an hour",
                "Glass is mostly sand heated until it melts. Glassblowers shape it while it "
                "glows, turning and blowing through a long pipe",
                "Whales sing songs that can travel for many miles under water, and the "
                "songs change a little from one year to the next",
                "The museum's new wing shows old clocks. Some are tiny pocket watches, and "
                "one is a tower clock as tall as a house",
                "Saving money gets easier with a plan. Put a small amount aside each week "
                "before you spend anything else"),
    interruptions=("Wait, stop for a second.", "Sorry, can I ask something else?",
                   "Hold on, that is not what I meant.", "Actually, never mind that.",
                   "Stop, I have another question.", "Hang on, let me interrupt you.",
                   "Wait.", "Stop please.", "Hey, quick question.", "Hmm, no, that is wrong.",
                   "Can you stop talking?", "Let me say something.", "Sorry, one thing.",
                   "Pause for a moment.", "Hold it right there.", "Alright, enough about that.",
                   "Yes but wait a moment.", "Right, but I need something else.",
                   "Sorry, I did not ask for that.", "Just a second, please."),
    backchannels=("mm-hm", "uh-huh", "yeah", "right", "mm", "sure", "yes", "got it",
                  "alright", "true", "exactly", "oh", "wow", "cool", "nice", "hmm",
                  "yeah yeah", "right right", "makes sense", "of course", "uh huh", "ah",
                  "oh really", "totally", "ok", "yes yes", "mm hmm", "I know", "go on",
                  "yup", "uh", "aha", "ooh", "hm", "ahh", "gotcha", "indeed", "sure thing",
                  "I get it", "understood", "fair enough", "sounds good", "I hear you",
                  "absolutely", "definitely", "for sure", "really", "interesting", "oh wow",
                  "oh nice", "that's right", "good", "great", "fine", "agreed", "very true",
                  "oh right", "keep going", "yeah sure", "uh-huh yeah", "mm yeah", "neat",
                  "no way", "ah right", "right, yeah", "oh yes", "sure, sure", "wow, really",
                  "yeah, that's true", "I understand", "ah, got it", "mm, interesting",
                  # a lone "I" or "ok" is a backchannel's start as often as an interruption's
                  "I bet", "I agree", "I guess so", "I follow", "I think so", "I suppose",
                  "I believe it", "I knew it", "I hear ya", "I like that", "ok ok", "ok then",
                  "ok, sure", "ok cool", "ok, right", "okey-dokey", "OK", "k"),
    timed=("Say {word} in {n} seconds.", "In {n} seconds, say {word}.",
           "Wait {n} seconds and then say {word}.", "Please say {word} after {n} seconds.",
           "{n} seconds from now, say {word}.", "I want you to say {word} in {n} seconds.",
           "Wait for {n} seconds, then tell me {word}.", "After waiting {n} seconds, say "
           "{word}.", "Count {n} seconds silently and then say {word}.",
           "In exactly {n} seconds, tell me {word}.", "Let {n} seconds pass, then say "
           "{word}.", "Say the word {word} {n} seconds from now.", "Hold on {n} seconds, "
           "then say {word}.", "{n} seconds later, say {word}.", "Once you have waited {n} "
           "seconds, say {word}.", "Say {word}, but only after {n} seconds.", "Let {n} "
           "seconds go by and say {word}.", "Pause {n} seconds before you say {word}."),
    when_passed=("Let me know when {n} seconds are up.", "Say something once {n} seconds "
                 "are over.", "Tell me when {n} seconds have gone by.", "Speak up after "
                 "{n} seconds.", "Let me know after {n} seconds.", "Ping me in {n} seconds."),
    counting=("Count to {m}, saying one number every {n} seconds.", "Count up to {m}, one "
              "number every {n} seconds.", "Every {n} seconds say the next number, up to "
              "{m}.", "Say one number every {n} seconds until you reach {m}.",
              "Count from one to {m}, a number each {n} seconds.", "Count slowly to {m}, "
              "{n} seconds per number.", "Give me a number every {n} seconds, up to {m}.",
              "Start counting, {n} seconds between numbers, and stop at {m}.", "Count up, "
              "one number each {n} seconds, until you get to {m}.", "Every {n} seconds, "
              "count one higher; stop at {m}.", "Please count to {m} with {n} seconds "
              "between the numbers."),
    counting_share=0.45,
    targets=_train_words(("apple", "hello", "ready", "tiger", "river", "pizza", "garden",
                          "music", "silver", "cookie", "planet") + COMMON_WORDS[::2]
                         + invented_words(120, seed=1)),
    text_cues=("When I say {cue}, you say {word}.", "If you hear me say {cue}, reply {word}.",
               "Every time I say {cue}, say {word}.", "Say {word} when I say {cue}.",
               "Whenever you hear {cue}, say {word}.", "Once I say {cue}, you say {word}.",
               "If I mention {cue}, say {word}.", "When the word {cue} comes, reply {word}.",
               "Listen for {cue} and then say {word}.", "Say {word} right after I say {cue}."),
    cue_words=_train_words(("banana", "purple", "elephant", "window", "jump", "coffee",
                            "magic", "yellow", "monday", "guitar") + COMMON_WORDS[1::2]
                           + invented_words(120, seed=2)),
    chatter=("okay so I went to the market this morning and bought some",
             "then my friend called me and we talked about the",
             "after lunch I walked to the park to see the",
             "my brother told me a funny story about a",
             "we spent the whole afternoon cleaning the",
             "last night we watched a long film about a",
             "my neighbour keeps a small garden with a",
             "on the way home the bus stopped next to a",
             "I could not find my keys so I looked under the",
             "the teacher showed the class a picture of a"),
    audio_cues=("When you hear a {sound}, say {word}.", "If you hear a {sound}, say {word}.",
                "Say {word} as soon as there is a {sound}.", "Say {word} when a {sound} "
                "sounds.", "Once you hear the {sound}, say {word}.", "Listen for a {sound} "
                "and say {word} right away.", "If a {sound} goes off, reply {word}.",
                "Say {word} the instant you hear a {sound}.", "Right when you hear a {sound}, "
                "say {word}.", "The second a {sound} rings out, tell me {word}.",
                "Say {word} immediately when a {sound} plays.", "When the {sound} comes, "
                "say {word} straight away.", "Wait for a {sound}, then say {word}.",
                "Whenever a {sound} is heard, answer {word}.", "Be ready: when there is a "
                "{sound}, say {word}.", "Say {word} as a {sound} starts."),
    sound_names=(("beep", "beep"), ("click", "click"), ("ding", "chime"), ("ring", "chime"),
                 ("gong", "chime"), ("ping", "beep"), ("buzz", "beep"), ("whistle", "beep"),
                 ("knock", "click"), ("tap", "click"), ("sound", "chime"), ("noise", "click"),
                 ("signal", "beep"), ("jingle", "chime"), ("clang", "chime"),
                 ("tinkle", "chime"), ("note", "beep"), ("hum", "beep"), ("chirp", "beep"),
                 ("pulse", "beep"), ("alarm", "beep"), ("bleep", "beep"), ("pip", "beep"),
                 ("toot", "beep"), ("clap", "click"), ("snap", "click"), ("pop", "click"),
                 ("ting", "chime"), ("dong", "chime"), ("cymbal", "chime"),
                 ("pitch", "beep"), ("tune", "chime"), ("blip", "beep"), ("boop", "beep"),
                 ("buzzer", "beep"), ("trill", "chime"), ("peal", "chime"), ("clink", "click"),
                 ("clack", "click"), ("chord", "chime"), ("sound effect", "beep"),
                 ("short sound", "click")),
    voices=("en-us", "en-gb", "en-us+f2", "en-gb+m3", "en-029+f5", "en-gb-scotland+m2",
            "en-us+m7", "en-gb-x-gbcwmd+f1", "en-us+klatt", "en-029+m4", "en-gb+f2",
            "en-gb-scotland+m6"),
    sound_onset_ms=(1000, 12001),
    wait_s=(2, 21),
    visual_colour_cues=("When the screen turns {colour}, say {word}.",
                        "If the screen goes {colour}, say {word}.",
                        "Say {word} when the screen becomes {colour}.",
                        "Once the picture turns {colour}, say {word}.",
                        "As the screen changes to {colour}, tell me {word}."),
    visual_shape_cues=("When you see a {shape}, say {word}.", "If a {shape} appears, say "
                       "{word}.", "Say {word} once you see a {shape}.", "Tell me {word} when "
                       "a {shape} shows on the screen."),
    colours=(("red", (220, 30, 30)), ("green", (30, 180, 40)), ("blue", (30, 60, 220)),
             ("yellow", (240, 220, 40)), ("pink", (250, 150, 200)), ("black", (15, 15, 15)),
             ("grey", (200, 200, 200)), ("brown", (120, 70, 30)), ("cyan", (40, 220, 230)),
             ("gold", (230, 180, 40)), ("navy", (20, 30, 110)), ("lime", (170, 240, 60)),
             ("cream", (250, 245, 215)), ("violet", (160, 90, 220)),
             ("amber", (255, 170, 10))),
    shapes=("circle", "square", "diamond", "cross"),
    capital_questions=("What is the capital of {country}?",
                       "Which city is the capital of {country}?"),
    capitals=(("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
              ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
              ("Russia", "Moscow"), ("China", "Beijing"), ("Greece", "Athens"),
              ("Canada", "Ottawa")),
    sum_questions=("What is {a} plus {b}?", "What do you get when you add {a} and {b}?"),
    colour_questions=("What colour is {thing}?",),
    thing_colours=(("the sky on a clear day", "blue"), ("fresh grass", "green"),
                   ("snow", "white"), ("a ripe banana", "yellow"), ("coal", "black")),
    yes_no=(("Is the sun a star?", "yes"), ("Can fish breathe under water?", "yes"),
            ("Is ice cold?", "yes"), ("Do cows lay eggs?", "no"),
            ("Is the moon made of cheese?", "no")),
    hard_sums=("What is {a} {op} {b}?", "Can you work out {a} {op} {b}?",
               "I need {a} {op} {b}, what does that make?", "Quick sum: {a} {op} {b}.",
               "Please calculate {a} {op} {b}."),
    operations=(("times", "*"), ("plus", "+"), ("minus", "-")),
    asides=("In the meantime I will open the window because it is warm in here.",
            "I am just going to write this down on the notepad next to me.",
            "While you are at it, remind me later that the shop closes early.",
            "Sorry, the dog is barking at the postman again, give me a second."),
)

BOOKS = {"train": TRAIN, "heldout": HELDOUT}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty", "twenty-one", "twenty-two",
                "twenty-three", "twenty-four", "twenty-five", "twenty-six", "twenty-seven",
                "twenty-eight", "twenty-nine", "thirty", "thirty-one", "thirty-two",
                "thirty-three", "thirty-four", "thirty-five", "thirty-six", "thirty-seven",
                "thirty-eight", "thirty-nine", "forty")


def number_forms(n: int) -> tuple[str, ...]:
    """How a number may be said: digits, and the word where we know it."""
    return (str(n), NUMBER_WORDS[n]) if n < len(NUMBER_WORDS) else (str(n),)
