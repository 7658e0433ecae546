import time
def test_hang(lab):
    n = lab.add_node("node1"); n.add_pod("a"); n.popen(["sleep", "300"])
    print("READY", flush=True)
    time.sleep(300)
