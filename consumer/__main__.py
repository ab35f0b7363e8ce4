"""`python -m consumer ...`: the `voiceclone` command line without the installed script."""

from consumer.cli import main

main()
