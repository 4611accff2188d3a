from audiofx.cli import main

main()
