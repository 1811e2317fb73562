"""The rules of Deep Reveal: ``actions`` (one transaction per player action, scoring), ``assignment`` (which
round next: a pluggable policy), ``settle`` (how settled a round's label is, for ``least-settled``),
``queries`` (leaderboard, a player's stats, the admin's progress) and ``opening`` (a study opened on its
database, ready to play)."""
