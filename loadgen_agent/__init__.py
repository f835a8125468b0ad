"""The LoadGen agent: persistent MLPerf LoadGen sessions, each a process of its own (LoadGen is a
per-process singleton) holding its dataset and data-plane connection across many tests."""
