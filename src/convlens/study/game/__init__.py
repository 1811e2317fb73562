"""The rules of Deep Reveal: ``actions`` (one transaction per player action, scoring, leases), ``plan`` (a
participant's quota planned at consent, the study's capacity), ``assignment`` (which rounds: a pluggable
policy), ``settle`` (how settled a round's label is, for ``least-settled``), ``queries`` (leaderboard, a
player's stats, the admin's progress) and ``opening`` (a study opened on its database, ready to play)."""
