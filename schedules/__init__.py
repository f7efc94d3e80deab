"""The shipped MetaSchedule tuning records, one folder per target, installed as the package
data `mixer_compile.schedules` (see pyproject.toml); read through importlib.resources by
mixer_compile.tune.database. The __init__ makes this a regular package, which an editable
install needs to find it."""
