"""The `enclaver` command line: parsing and printing only; the work happens in the packages it calls."""
