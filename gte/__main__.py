from gte.cli import main

main()
