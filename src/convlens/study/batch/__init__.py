"""A study's batch jobs: ``create`` (INV runs -> a study folder with every round's reveal images),
``export`` (every round, play, event and participant as CSV or JSON Lines) and ``data_dictionary``."""
