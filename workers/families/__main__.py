"""`python -m workers.families > docs/options.md`: the option reference, from the declarations."""

from workers.families import FAMILIES
from workers.options import reference

print(reference(FAMILIES.values()))
