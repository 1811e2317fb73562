"""A simulated crowd for Deep Reveal, to test and measure the whole loop: ``players`` (planted concepts,
players' behaviour and words; no I/O), ``play`` (its participants play a study through the real web API)
and ``recovery`` (did the label pipeline find the planted concepts and trends?). It lives beside the
study server, not in it: the server never imports it."""
