/*
 * The real node's pod sandbox process (containerd's "pause" image), written for the e2e stack
 * because no registry is reachable here. It holds the pod's namespaces open and does nothing
 * else: sleeps in pause(2), reaps any zombie re-parented to it (it is PID 1 of the pod when the
 * pod shares its process namespace), and exits 0 on SIGINT/SIGTERM so a pod stops at once.
 * Built static with musl (e2e/scripts/node.sh); about 20 KiB.
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = stop;
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) {
        return 1;
    }
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &sa, NULL) != 0) {
        return 2;
    }
    for (;;) {
        pause();
    }
}
