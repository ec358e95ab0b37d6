from lightning_ddd.cli import main

if __name__ == "__main__":
    main()
