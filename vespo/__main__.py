from vespo.cli import main

main()
