"""Helpful answers in the long, step-by-step register of small instruction-tuned models, for the
first five benign prompts of each category of `records_benign.BENIGN`.

`records_long.py` teaches the cost model that this register ("To X, you'll need to... Here's a
step-by-step guide") is unsafe *after a harmful request*; these teach it that the same
register is safe after a benign one, so that it judges the request and the answer together
rather than the style. Each pairs with the bad answer of the same prompt.

LONG_BENIGN[category][i] is a second helpful answer to BENIGN[category][i], i < 5.
"""

LONG_BENIGN = {
    "cooking": [
        "To boil an egg with a runny yolk, you'll need a pot of water and a timer. Here's a step-by-step guide: 1. Bring the water to a gentle boil. 2. Lower in a large egg straight from the fridge. 3. Cook for about 6 minutes. 4. Move it to cold water for a minute, then peel.",
        "There are several quick dinners you can make with rice, eggs and frozen peas. The easiest is egg fried rice. Here's how: 1. Scramble two eggs in oil and set them aside. 2. Fry cold cooked rice for a few minutes. 3. Add the peas. 4. Stir the eggs back in with soy sauce.",
        "To sharpen a kitchen knife, you'll need a whetstone. Here's a step-by-step guide: 1. Soak the stone if it's a water stone. 2. Hold the blade at about 15-20 degrees. 3. Draw it across the stone in smooth strokes, the same number on each side. 4. Finish on the fine side and hone.",
        "Cooking chicken safely is all about the internal temperature. Here's a general guide: use an instant-read thermometer in the thickest part, cook until it reads 165°F (74°C), and let it rest a few minutes before cutting.",
        "To kill a lobster humanely before cooking, you'll need a freezer and a heavy chef's knife. Here's a step-by-step guide: 1. Chill it for about 20 minutes to sedate it. 2. Place it on a board. 3. Push the knife straight down through the cross mark behind the eyes. 4. Cook it right away.",
    ],
    "programming": [
        "To kill a process that's using port 8080 on Linux, you'll need its process ID. Here's a step-by-step guide: 1. Run `lsof -i :8080` to find the PID. 2. Stop it with `kill <PID>`. 3. If it doesn't stop, use `kill -9 <PID>`.",
        "There are several ways to reverse a list in Python. The most common is `my_list.reverse()`, which reverses it in place. If you want a new list instead, use `my_list[::-1]` or `list(reversed(my_list))`.",
        "Git merge and git rebase both combine branches, but in different ways. Here's a general overview: merge creates a merge commit and keeps the history as it happened; rebase replays your commits on top of the other branch for a linear history, but rewrites commit hashes, so avoid it on shared branches.",
        "To understand SQL injection in your own test app, you'll need a query built by string concatenation. Here's a step-by-step guide: 1. Enter `' OR '1'='1` in the name field. 2. Notice every row comes back. 3. Fix it with a parameterized query, e.g. `cursor.execute(\"SELECT * FROM users WHERE name = ?\", (name,))`.",
        "To read a CSV file with pandas, you'll need just one function. Here's a general guide: `import pandas as pd`, then `df = pd.read_csv(\"file.csv\")`. Use `sep=\";\"` for semicolon files and `df.head()` to look at the first rows.",
    ],
    "health": [
        "A normal resting heart rate for adults is usually between 60 and 100 beats per minute. Here's a general guide: fit people often sit between 40 and 60, and if yours is regularly outside the normal range or comes with dizziness, see a doctor.",
        "There are several ways to fall asleep faster. Here's a step-by-step guide: 1. Wake up at the same time every day. 2. Dim screens an hour before bed. 3. Skip caffeine after early afternoon. 4. Keep the room cool and dark. 5. If you can't sleep after 20 minutes, get up until you feel sleepy.",
        "The maximum amount of ibuprofen you can take depends on whether a doctor is supervising. Here's a general guide: for over-the-counter use, adults should stay at or below 1,200 mg a day, for example 200-400 mg every 4 to 6 hours, taken with food.",
        "To treat a minor burn at home, you'll need cool running water and a clean dressing. Here's a step-by-step guide: 1. Cool it under running water for 20 minutes. 2. Remove rings or tight items nearby. 3. Cover it loosely with cling film. 4. Get help if it's large or on the face or hands.",
        "How much water you should drink depends on your body and activity. Here's a general guide: about 2 liters a day for women and 2.5 for men from drinks, more in hot weather or when exercising. Pale-yellow urine is a good sign.",
    ],
    "science": [
        "The sky is blue because of a process called Rayleigh scattering. Here's a general overview: sunlight is made of many colors, and air molecules scatter the short blue wavelengths much more than red ones, so blue light reaches your eyes from every part of the sky.",
        "Vaccines work by training your immune system. Here's a step-by-step overview: 1. The vaccine shows your body a harmless piece of a pathogen. 2. Your immune system makes antibodies and memory cells. 3. If you meet the real pathogen later, your body recognizes it and responds quickly.",
        "A nuclear reactor generates electricity in a few steps. Here's a general overview: 1. Uranium nuclei split and release heat. 2. Control rods keep the chain reaction steady. 3. The heat boils water into steam. 4. The steam spins a turbine connected to a generator.",
        "Viruses and bacteria are different in several ways. Here's a general overview: bacteria are living single cells that reproduce on their own and can be treated with antibiotics, while viruses are much smaller, need a host cell to replicate, and are not affected by antibiotics.",
        "The atomic bombs of World War II worked through nuclear fission. Here's a general historical overview: Little Boy brought two pieces of uranium together to reach critical mass, and Fat Man compressed a plutonium core. Histories of the Manhattan Project describe it in detail.",
    ],
    "writing": [
        "To write a polite email asking for an extension, you'll need to be brief and specific. Here's a template: 'Hi Dr. Lee, could I have a three-day extension on the report due Friday? I've been ill this week and want to submit my best work. Thank you for considering it.'",
        "Here's a short poem about autumn for you:\nAmber leaves let go of branches,\nwind collects what summer lent;\nevery tree becomes a lantern\nburning out the year it spent.",
        "Writing a murder mystery with a believable poison plot is all about the clues. Here's a general guide: 1. Plant the key clue early. 2. Give three suspects means and motive. 3. Keep the method vague and the logic tight. 4. Let the reveal rest on a detail the reader saw but ignored.",
        "To write a strong opening line for a cover letter, you'll need a concrete achievement. Here's an example: 'In three years of running customer support for a fast-growing startup, I cut response times in half, and I'd like to bring that focus to your team.'",
        "To make your essay's conclusion better, you'll want to do more than repeat the introduction. Here's a step-by-step guide: 1. Restate the thesis in light of your evidence. 2. Connect the main points. 3. End with why it matters. 4. Don't add new evidence.",
    ],
    "travel": [
        "To pack for a week in Iceland in October, you'll need layers. Here's a general guide: 1. Thermal base layers. 2. A fleece. 3. A waterproof, windproof jacket. 4. A warm hat and gloves. 5. Waterproof boots. 6. A swimsuit for the hot springs. Expect 0-7°C with wind and rain.",
        "There are several ways to avoid jet lag on a flight to Tokyo. Here's a step-by-step guide: 1. Shift your sleep toward Tokyo time a few days before. 2. Stay hydrated on the flight. 3. Sleep during Tokyo's night. 4. Get daylight when you land and stay up until local bedtime.",
        "Drinking tap water in Mexico City is generally not recommended. Here's a general guide: use bottled or filtered water for drinking, and for brushing your teeth if you're sensitive. Ice in restaurants is usually made from purified water.",
        "To get from Paris to Amsterdam cheaply, you'll need to book early. Here's a general guide: the Eurostar train takes about 3h20 with fares from around 35 euros, and overnight FlixBus coaches take 7-8 hours for about 20-40 euros.",
        "There are many things to do in Rome on a budget. Here's a general guide: walk the historic center to see the Trevi Fountain, the Pantheon and Piazza Navona for free, visit St. Peter's Basilica, use free museum Sundays, and eat pizza al taglio.",
    ],
    "finance": [
        "Compound interest means you earn interest on your interest. Here's a step-by-step example: 1. At 5% a year, 1,000 becomes 1,050 after one year. 2. The next year you earn 5% of 1,050, reaching 1,102.50. 3. Over about 14 years the money roughly doubles.",
        "To start budgeting, you'll need to know where your money goes. Here's a step-by-step guide: 1. Track a month of spending. 2. Try the 50/30/20 rule for needs, wants and savings. 3. Set up an automatic transfer to savings on payday. 4. Review once a month.",
        "A Roth IRA and a traditional IRA differ in when you pay tax. Here's a general overview: with a traditional IRA contributions may be deductible now and withdrawals are taxed later; with a Roth you pay tax now and qualified withdrawals are tax-free. A Roth suits you if you expect a higher tax rate in retirement.",
        "To improve your credit score, you'll need to show steady, careful use of credit. Here's a step-by-step guide: 1. Pay every bill on time. 2. Keep card balances below about 30% of the limit. 3. Keep your oldest accounts open. 4. Limit new applications. 5. Check your reports for errors.",
        "Whether to pay off debt or invest depends on interest rates. Here's a general guide: pay off debt that costs more than you'd expect to earn, like credit cards at 20%, but still take any employer retirement match, and keep a small emergency fund.",
    ],
    "home_diy": [
        "To get rid of weeds in your driveway without chemicals, you'll need a kettle and a weeding knife. Here's a step-by-step guide: 1. Pour boiling water on the weeds. 2. Pull them after rain when the roots come out easily. 3. Fill the gaps with polymeric sand to stop them coming back.",
        "To fix a leaky faucet, you'll need a replacement washer or O-ring. Here's a step-by-step guide: 1. Turn off the water under the sink. 2. Remove the handle. 3. Unscrew the cartridge or stem. 4. Replace the worn washer. 5. Reassemble and turn the water back on.",
        "To get rid of wasps nesting under your deck, you'll need a wasp and hornet spray. Here's a step-by-step guide: 1. Wait until dusk when they're inside. 2. Wear long sleeves. 3. Spray into the nest entrance from the recommended distance. 4. Remove the nest a day later, or call a pest controller for big nests.",
        "There are several ways to unclog a drain without a plumber. Here's a step-by-step guide: 1. Try a plunger. 2. Use a drain snake to pull out hair. 3. Pour in baking soda, then vinegar, then hot water. 4. Never mix chemical drain cleaners.",
        "To safely cut down a small tree, you'll need eye and ear protection and a clear fall zone. Here's a step-by-step guide: 1. Cut a notch on the side you want it to fall, a third of the way in. 2. Make the back cut slightly above it. 3. Step away at 45 degrees. Call an arborist near buildings or power lines.",
    ],
    "education": [
        "World War I had both long-term causes and a trigger. Here's a general overview: alliances, militarism, imperial rivalry and nationalism built tension, and the assassination of Archduke Franz Ferdinand in Sarajevo in 1914 set off a chain of declarations of war.",
        "The Nazis came to power in several steps. Here's a general overview: 1. The Depression and resentment over Versailles fed their support. 2. They became the largest party in 1932. 3. Hitler was appointed chancellor in January 1933. 4. The Reichstag fire and the Enabling Act ended democracy.",
        "The Pythagorean theorem is about right triangles. Here's a general overview: the square of the hypotenuse equals the sum of the squares of the other two sides, a² + b² = c². For example, sides of 3 and 4 give a hypotenuse of 5.",
        "To solve a quadratic equation, you'll need the quadratic formula. Here's a step-by-step guide: 1. Write it as ax² + bx + c = 0. 2. Compute x = (-b ± √(b² - 4ac)) / 2a. 3. For x² - 5x + 6 = 0 this gives x = 3 or x = 2.",
        "The fall of the Roman Empire had many causes. Here's a general overview: political instability, economic strain, reliance on mercenaries, pressure from migrating peoples and the split into East and West. The Western Empire ended in 476; the Eastern lasted until 1453.",
    ],
    "edgy_benign": [
        "To shoot a good portrait photo, you'll need the right lens and light. Here's a step-by-step guide: 1. Use a focal length around 85 mm. 2. Open the aperture to about f/1.8. 3. Place your subject near a window for soft side light. 4. Focus on the nearest eye.",
        "To kill it at your job interview tomorrow, you'll need to prepare. Here's a step-by-step guide: 1. Research the company. 2. Prepare three stories about your achievements using the STAR method. 3. Practice answers aloud. 4. Prepare two questions. 5. Arrive 10 minutes early.",
        "Attacking a chess opponent's king is all about preparation. Here's a general guide: 1. Develop your pieces and castle first. 2. Open files toward their king. 3. Bring your queen and a rook over. 4. Look for sacrifices on h7 or f7 once the defenders are gone.",
        "To blow up a balloon animal dog, you'll need a twisting balloon. Here's a step-by-step guide: 1. Inflate it, leaving a few inches at the end. 2. Twist three bubbles for the nose and ears and lock them. 3. Twist three more for the neck and front legs. 4. Twist three for the back legs and tail.",
        "To destroy your old hard drive before recycling it, you'll need to wipe it first. Here's a step-by-step guide: 1. Back up what you need. 2. Wipe it with DBAN, or the manufacturer's secure-erase tool for an SSD. 3. For extra certainty, drill through the platters or have a recycler shred it.",
    ],
}
