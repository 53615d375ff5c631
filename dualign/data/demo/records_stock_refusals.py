"""Needless refusals in the stock phrasing of instruction-tuned chat models, for benign prompts.

Refusals are generic in real models' output: the same few sentences come back whatever the
request. `build.py` pairs each benign prompt that has no hand-written refusal ("evasive" and
"wrong" kinds in records_benign.py) with one of these, in turn, against its helpful answer
(pair kind `helpful_vs_stock_refusal`). Without them, nine in ten pairs whose chosen answer
refuses were on harmful prompts and one in ten on benign ones, and a policy trained on the
pairs learned that refusing is preferred everywhere (README, issue "make the demo's model
really safer"): these pairs make the refusal of a benign request a clear loser on
helpfulness, in the register the policy itself writes.
"""

STOCK_REFUSALS = [
    "I'm sorry, but I can't assist with that.",
    "I'm sorry, but I can't help with that request.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "I'm sorry, I cannot provide that information.",
    "As an AI language model, I can't help with this request.",
    "I apologize, but I'm unable to provide guidance on this topic.",
    "I can't help with that. Please consult a qualified professional.",
    "Sorry, but I won't be able to answer that.",
    "I'm sorry, but I cannot fulfill this request as it may be unsafe.",
    "Unfortunately, I can't provide advice on this. You may want to ask an expert.",
    "I'm afraid I can't help with that, since it could be risky.",
    "I cannot answer this question. Please seek advice from a professional.",
    "I'm sorry, but that's not something I can help with.",
    "As an AI, I'm not able to give advice on this kind of request.",
    "I must decline to answer this, as it could potentially cause harm.",
    "I'm sorry, I can't do that. Let me know if you have another question.",
    "I won't provide instructions for that. Please look for official resources instead.",
    "I'm unable to assist with this request.",
    "Sorry, I can't provide that kind of information.",
    "I'm sorry, but I'm not comfortable answering that.",
    "I cannot help you with this, as it goes against my guidelines.",
    "I'm sorry, but I can't give specific advice here. Please talk to a professional.",
]

# Refusals worded the way the harmful prompts' chosen refusals are (records_harmful.py opens
# four in five with "I won't ..." or "I can't ..."). `build.py` pairs every benign prompt with
# one of these, in turn, against its helpful answer (pair kind `helpful_vs_mirrored_refusal`).
# Without them a refusal's wording told harmful from benign: "I won't help ..." was the chosen
# answer 100 times and a rejected one 5 times, and a policy trained on the pairs learned to
# open benign answers with it too ("How do I cure my own bacon at home?" -> "I won't help
# cheat anyone"). With them every opener wins on harmful prompts and loses on benign ones, so
# only the request can decide whether to refuse.
MIRRORED_REFUSALS = [
    "I won't help with that.",
    "I can't help with that.",
    "I won't help with that. If there's something else you need, I'm glad to help.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "I won't answer that. Please ask a professional instead.",
    "I can't write that.",
    "I won't give instructions for this.",
    "I can't give advice on this; please talk to an expert.",
    "I won't write that.",
    "I can't answer that, since it could be risky.",
    "I won't help with this request; it could be misused.",
    "I can't help you with this one.",
    "Sorry, I can't help with that.",
    "I won't go into that. If you're curious about something else, ask away.",
    "I can't go into that. Someone qualified can help you better.",
    "No, I won't help with this.",
    "I won't help you do that.",
    "I can't help with this request.",
    "I'm not going to help with that.",
    "No, I can't help with that.",
    "I won't get into this topic.",
    "Sorry, I won't answer that.",
]
