// The kernel floor of compare.sh's scenario 5: the least any process can spend to send one small
// message a second on each of SOCKETS loopback TCP sockets and read one reply on each, as a
// keepalive proxy must (a ping per leg, a pong per leg). No TLS, no WebSocket framing, no
// timers beyond one loop: what is left is the system calls and the loopback TCP path.
//
//   floor peer PORT                      echo server: answers every message with its bytes
//   floor pinger PORT SOCKETS SECONDS    connects SOCKETS sockets to the peer, sends on each once
//                                        a second, in 16 slots a second like wskeep's timer
//                                        grid, and prints its own CPU over SECONDS (after 3 s)
//
// Build: cc -O2 -o floor tests/bench/floor.c. Run the two on different CPUs (taskset).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 16

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void cpu(double *user, double *sys) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  *user = r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6;
  *sys = r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static int add(int ep, int fd, unsigned events) {
  struct epoll_event ev = {.events = events, .data.fd = fd};
  return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int peer(int ep, struct sockaddr_in *addr) {
  int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(l, (struct sockaddr *)addr, sizeof *addr) || listen(l, 4096) || add(ep, l, EPOLLIN)) {
    perror("floor peer");
    return 1;
  }
  struct epoll_event evs[512];
  char buf[4096];
  for (;;) {
    int k = epoll_wait(ep, evs, 512, -1);
    for (int i = 0; i < k; i++) {
      int fd = evs[i].data.fd;
      if (fd == l) {
        int c = accept4(l, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0 && (errno == EMFILE || errno == ENFILE)) {
          perror("floor peer: accept");  // the listener would stay ready and spin
          return 1;
        }
        if (c >= 0) {
          setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          add(ep, c, EPOLLIN | EPOLLET);
        }
        continue;
      }
      ssize_t n = read(fd, buf, sizeof buf);
      if (n > 0) {
        if (write(fd, buf, n) < 0) close(fd);
      } else if (n == 0) {
        close(fd);
      }
    }
  }
}

static int pinger(int ep, struct sockaddr_in *addr, int sockets, double seconds) {
  int one = 1, *fds = calloc(sockets, sizeof *fds);
  for (int i = 0; i < sockets; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)addr, sizeof *addr)) {
      perror("floor pinger");
      return 1;
    }
    setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fds[i], F_SETFL, O_NONBLOCK);
    // What tokio registers for every socket.
    add(ep, fds[i], EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET);
  }
  // Like wskeep's two legs: a masked WebSocket ping with an 8-byte payload is 14 bytes (the plain
  // upstream leg, odd sockets); over TLS 1.3 it is about 36 (the client leg, even sockets).
  char msg[36], buf[4096];
  memset(msg, 'p', sizeof msg);
  struct epoll_event evs[512];
  double start = now(), from = start + 3, u0 = 0, s0 = 0;
  long writes = 0, reads = 0;
  int measuring = 0;
  for (long tick = 1;; tick++) {
    double due = start + (double)tick / SLOTS;
    for (double wait; (wait = due - now()) > 0;) {
      int k = epoll_wait(ep, evs, 512, (int)(wait * 1000) + 1);
      for (int i = 0; i < k; i++) {
        if ((evs[i].events & EPOLLIN) && read(evs[i].data.fd, buf, sizeof buf) > 0) reads++;
      }
    }
    double t = now();
    if (!measuring && t >= from) {
      measuring = 1;
      cpu(&u0, &s0);
      from = t;
      writes = reads = 0;
    } else if (measuring && t >= from + seconds) {
      double u1, s1, span = t - from;
      cpu(&u1, &s1);
      printf("{\"sockets\":%d,\"cpu_pct\":%.2f,\"user_pct\":%.2f,\"sys_pct\":%.2f,\"writes_per_s\":%.0f,\"reads_per_s\":%.0f}\n",
             sockets, 100 * (u1 - u0 + s1 - s0) / span, 100 * (u1 - u0) / span, 100 * (s1 - s0) / span,
             writes / span, reads / span);
      return 0;
    }
    for (int i = tick % SLOTS; i < sockets; i += SLOTS) {
      if (write(fds[i], msg, i % 2 ? 14 : sizeof msg) > 0) writes++;
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 3 || (strcmp(argv[1], "peer") && (strcmp(argv[1], "pinger") || argc < 5))) {
    fprintf(stderr, "usage: floor peer PORT | floor pinger PORT SOCKETS SECONDS\n");
    return 2;
  }
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  signal(SIGPIPE, SIG_IGN);  // a reset socket's write fails instead of ending the process
  int ep = epoll_create1(0);
  return strcmp(argv[1], "peer") ? pinger(ep, &addr, atoi(argv[3]), atof(argv[4])) : peer(ep, &addr);
}
